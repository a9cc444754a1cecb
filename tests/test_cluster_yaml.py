"""cluster.yaml: valid for Ray's own cluster-launcher schema, wired the way the product needs."""

from __future__ import annotations

import copy
import itertools
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
REMOTE_ROOT = "~/ratatouille"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def home(path: str) -> str:
    """Spell $HOME/x and /home/ubuntu/x as ~/x, as a shell on the nodes would resolve them."""
    return re.sub(r"^(\$HOME|\$\{HOME\}|/home/ubuntu)(?=/|$)", "~", path)


def head_commands(cfg: dict) -> list[str]:
    return cfg.get("head_setup_commands", []) + cfg.get("head_start_ray_commands", [])


def env_exports(cfg: dict) -> dict[str, str]:
    """``export NAME=value`` lines the setup commands write into the nodes' shell environment."""
    text = "\n".join(cfg["setup_commands"] + cfg.get("head_setup_commands", []))
    return dict(re.findall(r"export ([A-Z_]+)=([^'\"\s]+)", text))


def worker_types(cfg: dict) -> dict[str, dict]:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


def test_cluster_yaml_passes_rays_schema_offline(cluster):
    had_boto3 = "boto3" in sys.modules
    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    if not had_boto3:  # preparing and validating needs no AWS client, so no credentials
        assert "boto3" not in sys.modules
    # the same validation does reject a broken config, so passing it means something
    broken = copy.deepcopy(prepared)
    broken["available_node_types"]["head"]["resources"]["CPU"] = -1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)


TOKEN_MOUNT = "~/.ray/auth_token"  # from the user's home, not from the repository


def test_file_mounts_sync_the_installable_package_and_the_configs(cluster, pyproject):
    mounts = {home(remote): local for remote, local in cluster["file_mounts"].items()}
    mounts.pop(TOKEN_MOUNT)
    for remote, local in mounts.items():  # `ray up` runs from the repo root and asserts these exist
        assert (REPO / local).exists(), f"file_mounts {remote}: {local} is missing"
    assert (REPO / mounts[f"{REMOTE_ROOT}/ratatouille"] / "__init__.py").is_file()
    assert (REPO / mounts[f"{REMOTE_ROOT}/pyproject.toml"]).resolve() == REPO / "pyproject.toml"
    readme = pyproject["project"]["readme"]  # setuptools refuses to build without it
    assert (REPO / mounts[f"{REMOTE_ROOT}/{readme}"]).resolve() == REPO / readme
    # `ray submit` runs from the head's home: experiments/... must resolve there
    assert (REPO / mounts["~/experiments"]).resolve() == REPO / "experiments"


def test_setup_commands_install_the_package_from_the_mount(cluster, pyproject):
    installs = [shlex.split(c) for c in cluster["setup_commands"] if "pip install" in c]
    assert len(installs) == 1
    args = installs[0]
    target = args[args.index("-e") + 1]
    root, extra = re.fullmatch(r"(.+)\[(\w+)\]", target).groups()
    assert home(root) == REMOTE_ROOT
    assert extra in pyproject["project"]["optional-dependencies"]
    assert any(
        dep.startswith("boto3") for dep in pyproject["project"]["optional-dependencies"][extra]
    )
    # installed into the venv that every node's shell (and so `ray start`) activates
    python = args[args.index("--python") + 1]
    venv = home(python).removesuffix("/bin/python")
    assert any(f"{venv.replace('~', '$HOME')}/bin/activate" in c for c in cluster["setup_commands"])


def test_head_runs_mlflow_server_with_database_backend_and_s3_artifacts(cluster):
    (command,) = [c for c in head_commands(cluster) if "mlflow server" in c]
    args = shlex.split(command)
    options = dict(itertools.pairwise(args))
    assert re.match(r"(sqlite|postgresql|mysql)[a-z+]*://", options["--backend-store-uri"])
    assert options["--artifacts-destination"].startswith("s3://")
    # loopback only: the driver is on the head, users come through an SSH tunnel
    assert options["--host"] == "127.0.0.1"
    assert command.rstrip(")").rstrip().endswith("&")  # in the background: `ray up` must not block
    served = f"http://{options['--host']}:{options['--port']}"
    assert env_exports(cluster)["MLFLOW_TRACKING_URI"] == served  # the driver, on the head
    assert f"curl -sf {served}/health" in command  # the start command's own check
    # users: an SSH tunnel to the head's loopback, as the file and the docs say
    tunnel = f"ray attach cluster.yaml -p {options['--port']}"
    assert tunnel in (REPO / "cluster.yaml").read_text()
    assert tunnel in (REPO / "docs" / "cluster.md").read_text()
    # only the head gets the tracking URI: the driver is MLflow's single writer
    assert "MLFLOW_TRACKING_URI" not in " ".join(cluster["setup_commands"])


def test_workers_have_gpus_and_scale_from_zero_while_the_head_has_none(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0
    assert not re.match(r"(g|p)\d", head["node_config"]["InstanceType"])
    workers = worker_types(cluster)
    assert workers
    for name, worker in workers.items():
        assert worker["resources"]["GPU"] >= 1, name
        assert re.match(r"(g|p)\d", worker["node_config"]["InstanceType"]), name  # EC2 GPU families
        assert worker["min_workers"] == 0 < worker["max_workers"] <= cluster["max_workers"], name
        # Tune checkpoints go to S3 from the workers: they need an instance profile
        assert worker["node_config"]["IamInstanceProfile"], name


def test_ray_starts_with_the_launchers_standard_commands(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert cluster["head_start_ray_commands"][0] == "ray stop"
    assert "ray start --head --port=6379" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert cluster["worker_start_ray_commands"][0] == "ray stop"
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(cluster["worker_start_ray_commands"])
    assert env_exports(cluster)["AWS_DEFAULT_REGION"] == cluster["provider"]["region"]


def test_cluster_experiment_configs_point_at_this_cluster(cluster):
    exports = env_exports(cluster)
    bucket = exports["RATATOUILLE_BUCKET"]
    assert "s3://$RATATOUILLE_BUCKET/mlflow" in " ".join(head_commands(cluster))
    synced = [c for c in cluster["worker_setup_commands"] if "aws s3 sync" in c]
    assert synced, "workers must fetch the datasets"
    data_dir = shlex.split(synced[0])[4]
    configs = sorted((REPO / "experiments").rglob("*.yaml"))
    on_cluster = [
        (path, cfg)
        for path in configs
        if str(
            ((cfg := yaml.safe_load(path.read_text())).get("tracking") or {}).get(
                "storage_path", ""
            )
        ).startswith("s3://")
    ]
    assert on_cluster, "no experiment config targets the cluster (tracking.storage_path: s3://...)"
    for path, cfg in on_cluster:
        tracking = cfg["tracking"]
        assert tracking["storage_path"].split("/")[2] == bucket, path
        assert tracking["mlflow_uri"] == exports["MLFLOW_TRACKING_URI"], path
        assert cfg["data"]["root"] == data_dir, path
        assert home(tracking["pool_path"]) in " ".join(cluster["head_setup_commands"]), path


COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def test_every_command_is_valid_bash(cluster):
    commands = [c for key in COMMAND_LISTS for c in cluster.get(key, [])]
    assert len(commands) > 5
    for command in commands:
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"


def test_environment_file_is_sourced_once_by_bashrc_and_exports_the_bucket(cluster, tmp_path):
    (tmp_path / ".bashrc").write_text("# distro bashrc\n")
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    for _ in range(2):  # `ray up` reruns setup on every update: no duplicate lines
        subprocess.run(["bash", "-c", cluster["setup_commands"][0]], env=env, check=True)
    assert (tmp_path / ".bashrc").read_text().count(".ratatouille_env") == 1
    shown = subprocess.run(
        ["bash", "-c", ". ~/.bashrc; echo $RATATOUILLE_BUCKET $AWS_DEFAULT_REGION $RAY_AUTH_MODE"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    bucket = env_exports(cluster)["RATATOUILLE_BUCKET"]
    assert shown == [bucket, cluster["provider"]["region"], "token"]


def ray_start_env(command: str) -> dict[str, str]:
    """``NAME=value`` assignments in front of ``ray start`` in one start command."""
    (start,) = [part for part in command.split(";") if "ray start" in part]
    words = shlex.split(start)
    return dict(w.split("=", 1) for w in words[: words.index("ray")] if "=" in w)


def test_token_authentication_is_on_and_every_node_has_the_token(cluster):
    from ray._private.authentication.authentication_token_setup import (
        AUTH_MODE_ENV_VAR,
        _get_default_token_path,
    )

    # Ray reads ~/.ray/auth_token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set
    default = "~/" + str(_get_default_token_path().relative_to(Path.home()))
    assert home(next(r for r in cluster["file_mounts"] if home(r) == TOKEN_MOUNT)) == default
    # copied from the user's machine (the updater expands ~ in local paths), and so from the
    # head to every worker: the head's bootstrap config mounts each remote path onto itself
    assert cluster["file_mounts"][TOKEN_MOUNT] == default
    assert any(f"chmod 600 {default}" in c for c in cluster["setup_commands"])
    # token mode for every shell (driver, ray status) and explicitly for both `ray start`s
    assert env_exports(cluster)[AUTH_MODE_ENV_VAR] == "token"
    (head_start,) = [c for c in cluster["head_start_ray_commands"] if "ray start" in c]
    (worker_start,) = [c for c in cluster["worker_start_ray_commands"] if "ray start" in c]
    assert ray_start_env(head_start) == {AUTH_MODE_ENV_VAR: "token"}
    assert ray_start_env(worker_start) == {AUTH_MODE_ENV_VAR: "token"}
    # the token itself never lives in the repository
    text = (REPO / "cluster.yaml").read_text()
    assert "RAY_AUTH_TOKEN" not in text
    assert f"{AUTH_MODE_ENV_VAR}=disabled" not in text


def test_a_nodes_shell_runs_ray_in_token_mode_with_the_mounted_token(cluster, tmp_path):
    """What a node sees after file_mounts and setup: Ray itself (its C++ token loader) finds the
    token at the mounted path and is in token mode; without the mode it would not be."""
    (tmp_path / ".bashrc").write_text("")
    token = tmp_path / TOKEN_MOUNT.removeprefix("~/")
    token.parent.mkdir()
    token.write_text("0123456789abcdef")  # what file_mounts copies
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    subprocess.run(["bash", "-c", cluster["setup_commands"][0]], env=env, check=True)
    (chmod,) = [c for c in cluster["setup_commands"] if c.startswith("chmod")]
    subprocess.run(["bash", "-c", chmod], env=env, check=True)
    assert token.stat().st_mode & 0o777 == 0o600
    probe = (
        "from ray._raylet import AuthenticationMode as M, AuthenticationTokenLoader as L, "
        "get_authentication_mode as mode; "
        "print(mode() == M.TOKEN, L.instance().get_raw_token(ignore_auth_mode=True))"
    )
    for setup, expected in ((". ~/.bashrc; ", "True 0123456789abcdef"), ("", "False")):
        shown = subprocess.run(
            ["bash", "-c", f"{setup}{shlex.quote(sys.executable)} -c {shlex.quote(probe)}"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert " ".join(shown[: len(expected.split())]) == expected


ONPREM = REPO / "deploy" / "onprem" / "cluster.yaml"  # run for real by tests/test_ray_up.py


def test_onprem_cluster_yaml_passes_rays_schema_and_is_wired_as_the_aws_one(cluster):
    onprem = yaml.safe_load(ONPREM.read_text())
    prepared = prepare_config(copy.deepcopy(onprem))
    validate_config(prepared)
    # the local provider turned the listed addresses into its single node type
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["max_workers"] == len(onprem["provider"]["worker_ips"]) > 0
    with pytest.raises(jsonschema.ValidationError):  # a misspelt key does not pass
        validate_config({**prepared, "file_mount": prepared["file_mounts"]})
    # the same synced layout and token as on AWS, so docs and `ray submit` lines carry over
    assert onprem["file_mounts"] == cluster["file_mounts"]
    assert any(f"chmod 600 {TOKEN_MOUNT}" in c for c in onprem["setup_commands"])
    assert env_exports(onprem)["RAY_AUTH_MODE"] == "token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in onprem[key] if "ray start" in c]
        assert ray_start_env(start) == {"RAY_AUTH_MODE": "token"}, key
    for command in [c for key in COMMAND_LISTS for c in onprem.get(key) or []]:
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"
