"""`ray up`, `ray submit` and `ray down` with deploy/onprem/cluster.yaml, as a user runs them,
against this machine over SSH on loopback: file_mounts (rsync over SSH), setup_commands (a venv
and an editable install from the synced copy) and the quickstart submitted to the head.

The "remote machine" is this host seen through a real OpenSSH sshd that the test starts and stops,
with its own host key and authorized key. Choices, and why:

- **OpenSSH's sshd, not a Python SSH server** (asyncssh): Ray's command runner drives the system
  `ssh` client with `-tt` (a pseudo-terminal), ControlMaster multiplexing and rsync's `--rsh`, so
  the server it talks to in production is OpenSSH; a Python server would have to reimplement
  PTYs, exec and signal semantics and could pass where OpenSSH fails. It is Debian's own
  `openssh-server` package (plus the client, rsync, which Ray's file_mounts need on both ends,
  and every library they need beyond the base system), unpacked by `make test` into .tools/ and
  run through its wrappers in .tools/bin (tests/system_tools.py): nothing is installed
  system-wide.
- **Its own PID and mount namespaces** (`unshare`, so the test runs as root, as CI does): the
  head's start commands and `ray down` run `ray stop`, which ends every Ray process it can see;
  inside the namespace it sees only this cluster's, never the session's Ray or other tests'.
  Killing sshd (PID 1 there) ends everything the cluster started. The mount namespace also gives
  the node its own /tmp/ray (so `RAY_ADDRESS=auto` finds this head, not another `ray start` on
  the host), a /etc/passwd with sshd's privilege-separation user (mandatory since OpenSSH 9) and
  root's home moved to a folder of the test, and a private /run for sshd's privsep directory.
- **Port 22 on a random 127.x.y.z address**: Ray's SSH runner has no port option, and all of
  127.0.0.0/8 is loopback on Linux, so each run gets its own address.
- **A provisioned machine**: the node's ~/venv exists before `ray up` (as on a machine image),
  with this environment's packages visible through a .pth file and Ray's console script, and pip
  set to offline (no index, no build isolation) in sshd's session environment. The config's
  setup_commands then run unchanged: they keep that venv and `pip install -e ~/ratatouille` from
  the synced copy, which the driver and Ray's workers import (checked), in seconds.
- The test's copy of the config changes only what a user edits (address, user, key, no workers),
  plus the head's Ray ports and CPU/memory, chosen free on this shared machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from local_processes import free_port, stop_group

# ray up (a venv install), the quickstart and ray down: 4 to 5 min on a busy 2-core machine
pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "deploy" / "onprem" / "cluster.yaml"
# wrappers around the unpacked binaries, with their libraries on the path (tests/system_tools.py)
TOOLS = REPO / ".tools" / "bin"
SSHD = TOOLS / "sshd"
RAY = str(Path(sys.executable).with_name("ray"))
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RAY_PROCESSES = ("gcs_server", "raylet")


@dataclass
class Node:
    address: str
    key: Path
    home: Path  # the node's home folder, as seen from this host
    sshd_pid: int  # sshd's PID on this host (PID 1 in the node's namespace)


def _sshd_config(root: Path, address: str) -> str:
    session_env = {  # what the provisioned machine's sessions see (sshd starts them clean)
        "PATH": f"{TOOLS}:{SYSTEM_PATH}",  # rsync for the file mounts
        "PIP_NO_INDEX": "1",
        "PIP_NO_BUILD_ISOLATION": "0",  # pip's spelling of "no build isolation"
        "RAY_USAGE_STATS_ENABLED": "0",
        "MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK": "true",
        "HF_HUB_OFFLINE": "1",
    }
    return "\n".join(
        [
            f"ListenAddress {address}:22",
            f"HostKey {root / 'host_key'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the test's folders, not a user's ~/.ssh
            "PidFile none",
            "SetEnv " + " ".join(f"{k}={v}" for k, v in session_env.items()),
            "",
        ]
    )


def _namespace_script(root: Path, home: Path) -> str:
    """What runs as PID 1 of the node: private mounts, then sshd in the foreground."""
    passwd = Path("/etc/passwd").read_text()
    passwd = re.sub(r"(?m)^root:([^:]*):0:0:([^:]*):[^:]*:", rf"root:\1:0:0:\2:{home}:", passwd)
    passwd += "sshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n"
    (root / "passwd").write_text(passwd)
    (root / "ray_tmp").mkdir()
    return "\n".join(
        [
            "set -e",
            "mount -t tmpfs tmpfs /run && mkdir -m 755 /run/sshd",
            f"mount --bind {root / 'passwd'} /etc/passwd",
            f"mount --bind {root / 'ray_tmp'} /tmp/ray",
            f"exec {SSHD} -D -e -f {root / 'sshd_config'}",
        ]
    )


def _provision(home: Path) -> None:
    """The node's ~/venv as a machine image would have it: this environment's packages (torch,
    Ray, MLflow, ...) importable, Ray's command on its PATH, no ratatouille of its own."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", home / "venv"], check=True)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = home / "venv" / "lib" / version / "site-packages"
    (site / "provisioned.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    ray = home / "venv" / "bin" / "ray"
    ray.write_text(
        f"#!{home / 'venv' / 'bin' / 'python'}\n"
        "import sys\nfrom ray.scripts.scripts import main\nsys.exit(main())\n"
    )
    ray.chmod(0o755)


def _listening(address: str, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((address, 22), timeout=1):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def node(tmp_path):
    """This host as a remote machine: an sshd on 127.x.y.z:22 in its own namespaces."""
    if not SSHD.is_file():
        pytest.fail(f"{SSHD} is missing: `make .tools/.unpacked` fetches sshd and rsync")
    if os.geteuid() != 0:
        pytest.fail("sshd's privilege separation and unshare need root (CI runs as root)")
    root = tmp_path / "node"
    home = root / "home"
    home.mkdir(parents=True)
    address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
    for name in ("host_key", "user_key"):
        keygen = [TOOLS / "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", root / name]
        subprocess.run(keygen, check=True)
    (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
    (root / "sshd_config").write_text(_sshd_config(root, address))
    (root / "start.sh").write_text(_namespace_script(root, home))
    _provision(home)
    Path("/tmp/ray").mkdir(exist_ok=True)  # the mount point of the node's own /tmp/ray
    log = root / "sshd.log"
    unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--kill-child"]
    sshd = subprocess.Popen(
        [*unshare, "bash", root / "start.sh"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert _listening(address, timeout=30), log.read_text()
        children = Path(f"/proc/{sshd.pid}/task/{sshd.pid}/children").read_text().split()
        yield Node(address, root / "user_key", home, int(children[0]))
    finally:
        stop_group(sshd)  # sshd is PID 1 of the namespace: whatever Ray left there ends too


def _ray_processes_of(node: Node) -> list[str]:
    """Ray's daemons running in the node's PID namespace, read from this host's /proc."""
    namespace = os.readlink(f"/proc/{node.sshd_pid}/ns/pid")
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and os.readlink(proc / "ns" / "pid") == namespace:
                name = (proc / "comm").read_text().strip()
                found += [name] if name in RAY_PROCESSES else []
    return found


def _test_config(node: Node, path: Path) -> str:
    """deploy/onprem/cluster.yaml with what a user edits, and ports free on this machine."""
    config = yaml.safe_load(CONFIG.read_text())
    config["cluster_name"] = f"rt-{uuid.uuid4().hex[:8]}"
    config["provider"].update(head_ip=node.address, worker_ips=[])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": str(node.key)}
    ports = {
        "--port": free_port(),
        "--dashboard-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--metrics-export-port": free_port(),
        "--ray-client-server-port": free_port(),
    }
    flags = " ".join(f"{flag}={port}" for flag, port in ports.items())
    flags += " --num-cpus=2 --object-store-memory=200000000"
    starts = config["head_start_ray_commands"]
    (i,) = [i for i, command in enumerate(starts) if "ray start --head" in command]
    starts[i] = re.sub(r" --port=\d+", "", starts[i]) + " " + flags
    path.write_text(yaml.safe_dump(config))
    return config["cluster_name"]


def _ray(env: dict, *args: str, timeout: float) -> subprocess.CompletedProcess:
    # from the repository root, as the config's file_mounts expect
    return subprocess.run(
        [RAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _user_env(tmp_path: Path) -> dict:
    """The user's shell: a home with a Ray token, `ray` and rsync on the PATH, no cluster."""
    home = tmp_path / "user"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{Path(RAY).parent}:{TOOLS}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    assert _ray(env, "get-auth-token", "--generate", timeout=60).returncode == 0
    return env


def _output(done: subprocess.CompletedProcess) -> str:
    return (done.stdout + done.stderr)[-6000:]


def test_ray_up_submit_down_on_premises_over_ssh(node, tmp_path):
    env = _user_env(tmp_path)
    config = tmp_path / "cluster.yaml"
    name = _test_config(node, config)
    try:
        up = _ray(env, "up", "-y", "--no-config-cache", str(config), timeout=600)
        assert up.returncode == 0, _output(up)
        _check_the_node_after_up(node, env, config)
        assert sorted(set(_ray_processes_of(node))) == sorted(RAY_PROCESSES)

        submit = _ray(
            env,
            *("submit", str(config), "experiments/submit.py", "--"),
            *("experiments/quickstart.yaml", "--steps", "12", "--n-runs", "2"),
            timeout=900,
        )
        assert submit.returncode == 0, _output(submit)
        assert "attached to the cluster at" in submit.stdout + submit.stderr
        _check_the_mlflow_store(node)

        down = _ray(env, "down", "-y", str(config), timeout=300)
        assert down.returncode == 0, _output(down)
        assert _ray_processes_of(node) == []
    finally:
        for suffix in ("state", "lock"):  # the local provider's files on the user's side
            Path(f"/tmp/ray/cluster-{name}.{suffix}").unlink(missing_ok=True)


def _check_the_node_after_up(node: Node, env: dict, config: Path) -> None:
    # file_mounts: the package, the configs and the user's token, as on the user's machine
    synced = node.home / "ratatouille" / "ratatouille" / "__init__.py"
    assert synced.read_text() == (REPO / "ratatouille" / "__init__.py").read_text()
    quickstart = node.home / "experiments" / "quickstart.yaml"
    assert quickstart.read_text() == (REPO / "experiments" / "quickstart.yaml").read_text()
    token = node.home / ".ray" / "auth_token"
    assert token.read_text() == (Path(env["HOME"]) / ".ray" / "auth_token").read_text()
    assert token.stat().st_mode & 0o777 == 0o600  # setup_commands' chmod
    # setup_commands: a shell on the node, in its home folder as `ray submit` runs, has token
    # mode on and imports the package installed into ~/venv from the synced copy
    probe = "import os, ratatouille as r; print('found', r.__file__, os.environ['RAY_AUTH_MODE'])"
    shown = _ray(env, "exec", str(config), f'python -c "{probe}"', timeout=120)
    found = re.search(r"^found (\S+) (\S+)", shown.stdout, re.MULTILINE)
    assert found, _output(shown)
    installed, mode = Path(found[1]), found[2]
    assert installed.is_relative_to(node.home / "venv") and mode == "token"
    assert installed.read_text() == synced.read_text()


def _check_the_mlflow_store(node: Node) -> None:
    # `ray submit` runs the driver in the head's home folder: the default stores are there
    store = node.home / "mlflow.db"
    assert store.is_file()  # (MlflowClient would create an empty one)
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("ratatouille.role") == "parent"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["ratatouille.run_dir"].startswith(str(node.home / "ray_results"))
    assert [r for r in runs if r.data.tags.get("ratatouille.role") == "reducer"]
    trials = [r for r in runs if r.data.tags.get("stage")]
    assert trials and all(r.info.status == "FINISHED" for r in trials)
    manifest = json.loads((node.home / "ray_results" / "pool" / "manifest.json").read_text())
    assert len(manifest["entries"]) == 6  # the quickstart's 3 auxiliary tasks x 2 runs
