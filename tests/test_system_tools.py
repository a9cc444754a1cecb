"""The sshd, ssh and rsync that `make test` unpacks run on a machine that has only the base
Debian system: checked in a chroot holding nothing else, and against each binary's own list of
the libraries it loads (read from the ELF files, not from the resolver under test)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import system_tools

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".tools"
SCRIPT = REPO / "tests" / "system_tools.py"
LIBS = TOOLS / "root" / "usr" / "lib" / system_tools.MULTIARCH


@pytest.fixture(scope="module")
def tools():
    if not (TOOLS / ".unpacked").exists():
        pytest.fail("no .tools/: `make test` (or `make .tools/.unpacked`) unpacks them first")
    return TOOLS


def _needed(elf: Path) -> list[str]:
    dynamic = subprocess.run(
        ["readelf", "-d", str(elf)], capture_output=True, text=True, check=True
    ).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dynamic)


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"\x7fELF"


def _run(action: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), action, str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy_without(tools: Path, tmp_path: Path, pattern: str) -> Path:
    copy = tmp_path / "tools"
    shutil.copytree(tools, copy, symlinks=True)
    removed = list((copy / LIBS.relative_to(TOOLS)).glob(pattern))
    assert removed, f"nothing matches {pattern}"
    for path in removed:
        path.unlink()
    return copy


def test_the_base_set_is_what_every_debian_has_and_not_what_the_tools_bring():
    base = system_tools.base_packages()
    assert {"libc6", "dpkg", "coreutils", "zlib1g"} <= base
    assert not {"libpopt0", "libwrap0", "libssl3", "rsync"} & base


def test_every_library_the_tools_load_is_unpacked_or_in_the_base_system(tools):
    base_sonames = {path.name for path in system_tools.base_libraries()}
    unpacked = {path.name for path in LIBS.iterdir()}
    unpacked |= {path.name for path in (TOOLS / "root" / "lib").rglob("*.so*")}
    elves = [TOOLS / "root" / binary for binary in system_tools.TOOLS.values()]
    elves += [p for p in LIBS.glob("*.so*") if p.is_file() and not p.is_symlink() and _is_elf(p)]
    missing = {
        f"{elf.name}: {soname}"
        for elf in elves
        for soname in _needed(elf)
        if soname not in unpacked and soname not in base_sonames
    }
    assert not missing
    # the library whose absence broke a fresh machine is among the unpacked ones
    assert "libpopt.so.0" in _needed(TOOLS / "root" / "usr" / "bin" / "rsync")
    assert "libpopt.so.0" in unpacked


def test_each_tool_runs_with_only_the_base_system_libraries(tools):
    done = _run("isolated", tools)
    assert done.returncode == 0, done.stderr


def test_a_library_missing_from_the_unpacked_tree_fails_in_one_line(tools, tmp_path):
    copy = _copy_without(tools, tmp_path, "libpopt.so*")
    done = _run("isolated", copy)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "rsync" in lines[0] and "libpopt.so.0 not found" in lines[0]
    assert "make .tools/.unpacked" in lines[0]


def test_the_chroot_does_not_see_the_host_libraries(tools, tmp_path):
    # libssl3 is not in the base set (though this machine may have it installed): without its
    # unpacked copy the tools must fail in the chroot, whatever the host has
    copy = _copy_without(tools, tmp_path, "libcrypto.so*")
    done = _run("isolated", copy)
    assert done.returncode == 1
    assert "libcrypto.so.3 not found" in done.stderr


def test_the_check_names_a_tool_that_is_not_there(tools, tmp_path):
    copy = tmp_path / "tools"
    shutil.copytree(tools, copy, symlinks=True)
    (copy / "bin" / "sshd").unlink()
    done = _run("check", copy)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and "bin/sshd is missing" in done.stderr
