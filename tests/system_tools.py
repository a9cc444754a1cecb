"""OpenSSH's sshd and client and rsync for tests/test_ray_up.py, brought by the project itself.

`make test` runs ``unpack`` once (into ``.tools/``) and ``check`` before every suite. Nothing is
installed system-wide: the Debian packages are fetched with ``apt-get download`` and unpacked with
``dpkg -x``, which brings no dependencies, so ``unpack`` resolves them itself: every library
package the tools depend on, transitively, except the ones every Debian system has (the Essential
and Priority-required packages and what they depend on). ``.tools/bin`` holds one wrapper per tool
that puts the unpacked library folders on ``LD_LIBRARY_PATH``; nothing else needs to know.

    python tests/system_tools.py unpack .tools     # fetch, unpack, write the wrappers
    python tests/system_tools.py check .tools      # each tool runs, or one line says what to do
    python tests/system_tools.py isolated .tools   # the same in a chroot with only base libraries
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable
from pathlib import Path

ROOT_PACKAGES = ("openssh-server", "openssh-client", "rsync")
TOOLS = {  # wrapper name -> the binary inside the unpacked tree
    "sshd": "usr/sbin/sshd",
    "ssh": "usr/bin/ssh",
    "ssh-keygen": "usr/bin/ssh-keygen",
    "rsync": "usr/bin/rsync",
}
MULTIARCH = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
CHECK_KEY = "check_key"  # a key made at unpack time, so `check` can run ssh-keygen on it
HOW_TO_FIX = (
    "remove .tools and run `make .tools/.unpacked` again (needs apt-get and Debian's package "
    "lists), or install Debian's openssh-server, openssh-client and rsync"
)


class ToolMissing(Exception):
    """A tool that does not run; the message is the one line the user sees."""


# -- what to unpack --------------------------------------------------------------------------
def _stanzas(packages: Iterable[str]) -> dict[str, dict[str, str]]:
    """apt's record of each package (candidate version); virtual packages have none."""
    names = sorted(set(packages))
    if not names:
        return {}
    shown = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", *names],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    records: dict[str, dict[str, str]] = {}
    for block in shown.split("\n\n"):
        fields = dict(re.findall(r"(?m)^([A-Za-z-]+): (.*(?:\n .*)*)", block))
        if "Package" in fields:
            records.setdefault(fields["Package"], fields)
    return records


def _dependencies(record: dict[str, str]) -> list[str]:
    """Pre-Depends and Depends, first alternative of each, without versions or arch tags."""
    names = []
    for field in ("Pre-Depends", "Depends"):
        for group in record.get(field, "").split(","):
            first = group.split("|")[0].strip()
            if first:
                names.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
    return names


def closure(roots: Iterable[str], follow=lambda name: True) -> set[str]:
    """Every package reachable from ``roots`` through dependencies ``follow`` accepts."""
    seen: set[str] = set()
    frontier = set(roots)
    while frontier:
        records = _stanzas(frontier)
        seen |= set(records)
        frontier = {
            dep
            for record in records.values()
            for dep in _dependencies(record)
            if dep not in seen and follow(dep)
        }
    return seen


def base_packages() -> set[str]:
    """What every Debian system has: Essential and Priority-required packages (dpkg keeps them
    installed) and their dependencies."""
    listed = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\t${Essential}\t${Priority}\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    roots = []
    for line in listed:
        name, essential, priority = [*line.split("\t"), "", "", ""][:3]
        if essential == "yes" or priority == "required":
            roots.append(name)
    return closure(roots)


def packages_to_unpack() -> list[str]:
    """The tools' packages and the library packages they need beyond the base system."""
    base = base_packages()
    needed = closure(ROOT_PACKAGES, follow=lambda name: name.startswith("lib") and name not in base)
    return sorted(needed - base)


# -- unpacking -------------------------------------------------------------------------------
def _wrapper(binary: str) -> str:
    # Paths relative to the wrapper (no dirname: a chroot may have no coreutils).
    return (
        "#!/bin/sh\n"
        'tools="${0%/*}/.."\n'
        f'libs="$tools/root/usr/lib/{MULTIARCH}:$tools/root/lib/{MULTIARCH}"\n'
        'LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" '
        f'exec "$tools/root/{binary}" "$@"\n'
    )


def _download(packages: list[str], folder: Path) -> None:
    # as root, apt's sandbox user could not write into the project's folder
    sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
    fetch = ["apt-get", "download", "-qq", *sandbox, *packages]
    if subprocess.run(fetch, cwd=folder, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True)  # stale or missing lists
        subprocess.run(fetch, cwd=folder, check=True)


def unpack(tools: Path) -> None:
    packages = packages_to_unpack()
    shutil.rmtree(tools, ignore_errors=True)
    debs, root, bin_dir = tools / "debs", tools / "root", tools / "bin"
    for folder in (debs, root, bin_dir):
        folder.mkdir(parents=True)
    _download(packages, debs)
    for deb in sorted(debs.glob("*.deb")):
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    for name, binary in TOOLS.items():
        wrapper = bin_dir / name
        wrapper.write_text(_wrapper(binary))
        wrapper.chmod(0o755)
    (tools / "packages.txt").write_text("\n".join(packages) + "\n")
    key = tools / CHECK_KEY
    subprocess.run(
        [str(bin_dir / "ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
    )
    shutil.rmtree(debs)


# -- checking --------------------------------------------------------------------------------
def check_commands(tools: Path) -> dict[str, list[str]]:
    """One command per tool that runs it without side effects; exit 0 when it loads."""
    bin_dir = tools / "bin"
    return {
        "rsync": [str(bin_dir / "rsync"), "--version"],
        "sshd": [str(bin_dir / "sshd"), "-V"],
        "ssh": [str(bin_dir / "ssh"), "-V"],
        "ssh-keygen": [str(bin_dir / "ssh-keygen"), "-l", "-f", str(tools / f"{CHECK_KEY}.pub")],
    }


def _failure(name: str, tools: Path, done: subprocess.CompletedProcess) -> str:
    output = (done.stdout + done.stderr).strip()
    missing = re.search(r"error while loading shared libraries: ([^:]+)", output)
    cause = (
        f"{missing.group(1)} not found" if missing else (output.splitlines() or ["no output"])[-1]
    )
    return f"{name} from {tools} does not run ({cause}): {HOW_TO_FIX}"


def check(tools: Path, runner: list[str] | None = None) -> None:
    """Raise ToolMissing naming the first tool that does not run (``runner`` prefixes each
    command, e.g. a chroot)."""
    for name, command in check_commands(tools).items():
        if not Path(command[0]).exists():
            raise ToolMissing(f"{command[0]} is missing: {HOW_TO_FIX}")
        done = subprocess.run(
            [*(runner or []), "/bin/sh", *command],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if done.returncode != 0:
            raise ToolMissing(_failure(name, tools, done))


def base_libraries() -> list[Path]:
    """The shared objects the base packages installed on this machine."""
    listed = subprocess.run(
        ["dpkg-query", "-L", *sorted(base_packages())],
        capture_output=True,
        text=True,
        check=False,  # a base dependency not installed here is simply not copied
    ).stdout.split("\n")
    return [
        Path(line)
        for line in listed
        if re.search(r"/lib[^/]*/(.*/)?[^/]+\.so(\.\d+)*$", line) and os.path.lexists(line)
    ]


def _copy_in(jail: Path, path: Path) -> None:
    target = jail / path.relative_to("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        target.unlink(missing_ok=True)
        target.symlink_to(os.readlink(path))
    elif path.is_file():
        shutil.copy2(path, target)


def make_jail(tools: Path, jail: Path) -> Path:
    """A root folder with the base libraries, /bin/sh and the unpacked tools at their path."""
    for library in base_libraries():
        _copy_in(jail, library)
    for merged in ("bin", "lib", "lib64", "sbin"):  # usrmerge: /lib -> usr/lib
        if Path("/" + merged).is_symlink() and not (jail / merged).exists():
            (jail / merged).symlink_to(os.readlink("/" + merged))
    _copy_in(jail, Path(os.path.realpath("/bin/sh")))
    shell = jail / "bin" / "sh"
    if not shell.exists():
        shell.symlink_to(os.path.realpath("/bin/sh"))
    for name in ("passwd", "group"):
        _copy_in(jail, Path("/etc") / name)
    (jail / "dev").mkdir(exist_ok=True)
    subprocess.run(["mknod", "-m", "666", str(jail / "dev" / "null"), "c", "1", "3"], check=True)
    inside = jail / tools.resolve().relative_to("/")
    shutil.copytree(tools, inside, symlinks=True)
    return inside


def isolated(tools: Path) -> None:
    """check() in a chroot that has only the base system's libraries and the unpacked tree."""
    if os.geteuid() != 0:
        raise ToolMissing("the isolated check needs root (chroot, mknod); CI runs as root")
    with tempfile.TemporaryDirectory() as folder:
        jail = Path(folder)
        inside = make_jail(tools, jail)
        check(Path("/") / inside.relative_to(jail), runner=["chroot", str(jail)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("unpack", "check", "isolated", "packages"))
    parser.add_argument("tools", type=Path, nargs="?", default=Path(".tools"))
    args = parser.parse_args(argv)
    tools = args.tools.resolve()
    try:
        if args.action == "unpack":
            unpack(tools)
        elif args.action == "packages":
            print("\n".join(packages_to_unpack()))
        elif args.action == "check":
            check(tools)
        else:
            isolated(tools)
    except ToolMissing as missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
