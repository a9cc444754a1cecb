"""deploy/kuberay: valid for KubeRay's CRD schemas (vendored, offline), wired the way the product
needs. Nothing here talks to a Kubernetes cluster."""

from __future__ import annotations

import configparser
import copy
import itertools
import json
import re
import secrets
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ratatouille.core.config import parse_config
from tiny import tiny_config

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "deploy" / "kuberay"
KUBERAY_VERSION = "v1.7.0"
CRDS = KUBERAY / "crds" / KUBERAY_VERSION
WORKDIR = "/home/ray/ratatouille"
GPU_LIMITS = ("workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources", "limits")


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def one(name: str, kind: str) -> dict:
    (doc,) = [d for d in documents(name) if d["kind"] == kind]
    return doc


def crd(plural: str) -> dict:
    return json.loads((CRDS / f"ray.io_{plural}.json").read_text())


def kubernetes_schema(node: Any) -> Any:
    """An OpenAPI v3 schema of a CRD as a JSON schema that checks what the API server checks:
    ``x-kubernetes-int-or-string`` admits an integer or a string and nothing else,
    ``nullable`` admits null, and an object with declared properties refuses unknown fields (as
    `kubectl apply`'s strict field validation does) unless ``x-kubernetes-preserve-unknown-fields``
    keeps them; an embedded resource also has apiVersion, kind and metadata."""
    if isinstance(node, list):
        return [kubernetes_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: kubernetes_schema(value) for key, value in node.items()}
    if out.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if out.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def validator(plural: str) -> jsonschema.Draft7Validator:
    schema = kubernetes_schema(crd(plural)["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def check(manifest: dict, plural: str) -> None:
    definition = crd(plural)
    assert manifest["apiVersion"] == f"{definition['group']}/{definition['version']}"
    assert manifest["kind"] == definition["kind"]
    # the schema's root also describes apiVersion/kind/metadata/status; spec is what we write
    validator(plural).validate({k: v for k, v in manifest.items() if k != "status"})


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return one("raycluster.yaml", "RayCluster")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return one("rayjob.yaml", "RayJob")


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def job_config() -> dict:
    configmap = one("experiment.yaml", "ConfigMap")
    return yaml.safe_load(configmap["data"]["pacs.yaml"])


def containers(cluster_spec: dict) -> list[dict]:
    pods = [cluster_spec["headGroupSpec"]] + cluster_spec["workerGroupSpecs"]
    return [c for pod in pods for c in pod["template"]["spec"]["containers"]]


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_crds_are_the_vendored_kuberay_release():
    for plural, kind in (("rayclusters", "RayCluster"), ("rayjobs", "RayJob")):
        definition = crd(plural)
        assert definition["source"]["tag"] == KUBERAY_VERSION
        assert definition["kind"] == kind
        assert definition["openAPIV3Schema"]["properties"]["spec"]["type"] == "object"
    assert KUBERAY_VERSION in (KUBERAY / "README.md").read_text()


def test_manifests_pass_the_kuberay_crd_schemas(raycluster, rayjob):
    check(raycluster, "rayclusters")
    check(rayjob, "rayjobs")
    # one cluster definition: the RayJob brings up the same cluster as raycluster.yaml
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("workerGroupSpecs", 0, "maxReplicas"), "eight"),  # a string where an integer is required
        (("workerGroupSpecs", 0, "replicas"), 1.5),
        (("headGroupSpec", "rayStartParams", "num-cpus"), 0),  # rayStartParams are strings
        (("authOptions", "mode"), "password"),  # not in the enum
        (("headGroupSpec", "serviceTyp"), "ClusterIP"),  # a misspelt field
        ((*GPU_LIMITS, "nvidia.com/gpu"), [1]),  # a list where a quantity is required
    ],
)
def test_a_schema_violation_fails_validation(raycluster, path, value):
    broken = copy.deepcopy(raycluster)
    node = broken["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        check(broken, "rayclusters")


def test_int_or_string_and_preserved_fields_follow_kubernetes():
    schema = kubernetes_schema(
        {
            "type": "object",
            "properties": {
                "q": {"x-kubernetes-int-or-string": True},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            },
        }
    )
    jsonschema.validate({"q": 4, "free": {"anything": 1}}, schema)
    jsonschema.validate({"q": "500m"}, schema)
    for bad in ({"q": 4.5}, {"q": [4]}, {"other": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_head_runs_no_trial_and_workers_have_gpus(raycluster):
    spec = raycluster["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    gpu_groups = [
        group
        for group in spec["workerGroupSpecs"]
        if int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        >= 1
    ]
    assert gpu_groups
    for group in gpu_groups:
        assert group["minReplicas"] == 0 < group["maxReplicas"]
    assert spec["enableInTreeAutoscaling"] is True


def test_token_authentication_is_on(raycluster):
    # KubeRay creates the token Secret and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in every Ray pod
    assert raycluster["spec"]["authOptions"]["mode"] == "token"
    for container in containers(raycluster["spec"]):
        assert env(container).get("RAY_AUTH_MODE", "token") == "token"


def test_job_config_is_pacs_with_storage_on_s3(job_config, raycluster):
    parse_config(job_config, "experiment.yaml")  # the product's own validation
    pacs = yaml.safe_load((REPO / "experiments" / "domainbed" / "pacs.yaml").read_text())
    assert {k: v for k, v in job_config.items() if k != "tracking"} == {
        k: v for k, v in pacs.items() if k != "tracking"
    }
    tracking = job_config["tracking"]
    assert tracking["storage_path"].startswith("s3://")
    bucket = tracking["storage_path"].split("/")[2]
    # the pool in the same bucket: an ephemeral cluster keeps it between jobs
    assert tracking["pool_path"].startswith(f"s3://{bucket}/")
    # the datasets come from the same bucket, onto the workers, where the config reads them
    for group in raycluster["spec"]["workerGroupSpecs"]:
        (init,) = group["template"]["spec"]["initContainers"]
        source, target = init["command"][3:5]
        assert source == f"s3://{bucket}/datasets"
        assert target == job_config["data"]["root"]
        assert job_config["data"]["root"] in [
            m["mountPath"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]
        ]
    mlflow = one("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]
    options = dict(itertools.pairwise(mlflow["command"]))
    assert options["--artifacts-destination"] == f"s3://{bucket}/mlflow"


def test_mlflow_is_its_own_service_that_the_driver_logs_to(raycluster, job_config):
    deployment = one("mlflow.yaml", "Deployment")
    service = one("mlflow.yaml", "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["mlflow", "server"]
    options = dict(itertools.pairwise(container["command"]))
    assert re.match(r"(sqlite|postgresql|mysql)[a-z+]*://", options["--backend-store-uri"])
    assert options["--host"] == "0.0.0.0"
    (port,) = service["spec"]["ports"]
    assert str(port["targetPort"]) == options["--port"]
    url = f"http://{service['metadata']['name']}:{port['port']}"
    assert f"{service['metadata']['name']}:{port['port']}" in options["--allowed-hosts"].split(",")
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert env(head)["MLFLOW_TRACKING_URI"] == url
    assert job_config["tracking"]["mlflow_uri"] == url
    # the SQLite database is on a volume that outlives the pod
    (volume,) = [
        v for v in deployment["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v
    ]
    claim = one("mlflow.yaml", "PersistentVolumeClaim")["metadata"]["name"]
    assert volume["persistentVolumeClaim"]["claimName"] == claim
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert options["--backend-store-uri"].removeprefix("sqlite:///").startswith(mount["mountPath"])


def test_rayjob_runs_the_experiment_from_the_configmap(rayjob):
    entrypoint = rayjob["spec"]["entrypoint"]
    assert entrypoint.split() == [
        "python",
        f"{WORKDIR}/experiments/submit.py",
        f"{WORKDIR}/experiments/kuberay/pacs.yaml",
    ]
    # KubeRay's submitter runs `ray job submit ... -- ENTRYPOINT ;` in a shell: no operators
    assert not re.search(r"[;&|<>`$()]", entrypoint)
    assert (REPO / "experiments" / "submit.py").is_file()
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (volume,) = [v for v in head["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == one("experiment.yaml", "ConfigMap")["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in head["containers"][0]["volumeMounts"]}
    assert mounts[volume["name"]] == f"{WORKDIR}/experiments/kuberay"


def test_every_pod_runs_the_image_the_dockerfile_builds(raycluster, pyproject):
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    (image,) = set(re.findall(r"docker build -f deploy/kuberay/Dockerfile -t (\S+) \.", dockerfile))
    assert f"docker push {image}" in dockerfile
    assert image.endswith(":" + pyproject["project"]["version"])
    assert image in (REPO / "docs" / "cluster.md").read_text()
    mlflow = one("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    assert {c["image"] for c in containers(raycluster["spec"]) + mlflow} == {image}
    # the base image is Ray's, of the version pyproject pins and the cluster declares
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    ray_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    pinned = ray_pin.split("==")[1].removesuffix(".*")
    assert re.fullmatch(rf"rayproject/ray:{re.escape(pinned)}\.\d+-py311-gpu", base)
    assert base.split(":")[1].split("-")[0] == raycluster["spec"]["rayVersion"]
    # the package is installed from pyproject.toml, with what `pip install .` needs
    (extras,) = re.findall(r"^RUN pip install [^\n]*\"\.\[([\w,]+)\]\"", dockerfile, flags=re.M)
    optional = pyproject["project"]["optional-dependencies"]
    installed = [dep for extra in extras.split(",") for dep in optional[extra]]
    assert any(dep.startswith("boto3") for dep in installed)  # S3
    assert any(dep.startswith("mlflow[auth]") for dep in installed)  # mlflow.yaml's basic auth
    readme = pyproject["project"]["readme"]
    assert re.search(rf"^COPY \S* ?pyproject\.toml {readme} \./$", dockerfile, flags=re.M)
    assert re.search(r"^COPY \S* ?ratatouille \./ratatouille$", dockerfile, flags=re.M)
    assert re.search(r"^COPY \S* ?experiments \./experiments$", dockerfile, flags=re.M)
    assert re.search(rf"^WORKDIR {WORKDIR}$", dockerfile, flags=re.M)
    assert "torch==2.14.1" in pyproject["project"]["dependencies"]


AUTH_SECRET = "ratatouille-mlflow-auth"


def mlflow_container() -> dict:
    (container,) = one("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def secret_refs(container: dict) -> dict[str, tuple[str, str]]:
    """name -> (Secret, key) of the env entries a container takes from Secrets."""
    return {
        e["name"]: (ref["name"], ref["key"])
        for e in container.get("env", [])
        if (ref := e.get("valueFrom", {}).get("secretKeyRef"))
    }


def pod_labels(group: dict, node_type: str) -> dict[str, str]:
    """The labels of a Ray pod: its template's and those KubeRay adds (ray.io/node-type,
    ray.io/cluster, ...; the cluster name is generated for a RayJob, so only the type is
    predictable)."""
    return {
        **group["template"].get("metadata", {}).get("labels", {}),
        "ray.io/node-type": node_type,
    }


def test_mlflow_requires_a_login_whose_credentials_come_from_a_secret(raycluster, rayjob):
    container = mlflow_container()
    options = dict(itertools.pairwise(container["command"]))
    assert options["--app-name"] == "basic-auth"
    refs = secret_refs(container)
    assert refs["MLFLOW_AUTH_ADMIN_USERNAME"] == (AUTH_SECRET, "username")
    assert refs["MLFLOW_AUTH_ADMIN_PASSWORD"] == (AUTH_SECRET, "password")
    assert refs["MLFLOW_FLASK_SERVER_SECRET_KEY"][0] == AUTH_SECRET
    # MLflow's auth settings: the ConfigMap mounted where MLFLOW_AUTH_CONFIG_PATH points
    ini_path = Path(env(container)["MLFLOW_AUTH_CONFIG_PATH"])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = one("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["volumes"]
    (auth_volume,) = [v for v in volumes if "configMap" in v]
    assert mounts[auth_volume["name"]] == str(ini_path.parent)
    configmap = next(
        d
        for d in documents("mlflow.yaml")
        if d["metadata"]["name"] == auth_volume["configMap"]["name"]
    )
    ini = configparser.ConfigParser()
    ini.read_string(configmap["data"][ini_path.name])
    assert "admin_password" not in ini["mlflow"]
    # the user database on the volume that keeps the runs, not in the pod's ephemeral disk
    database = ini["mlflow"]["database_uri"].removeprefix("sqlite:///")
    assert database.startswith(mounts["db"] + "/")
    # the driver (the head) logs in with the same Secret; workers never talk to MLflow
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert secret_refs(head)["MLFLOW_TRACKING_USERNAME"] == refs["MLFLOW_AUTH_ADMIN_USERNAME"]
        assert secret_refs(head)["MLFLOW_TRACKING_PASSWORD"] == refs["MLFLOW_AUTH_ADMIN_PASSWORD"]
        for group in spec["workerGroupSpecs"]:
            for worker in group["template"]["spec"]["containers"]:
                assert not {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_PASSWORD"} & {
                    e["name"] for e in worker.get("env", [])
                }


SECRET_WORDS = re.compile(r"password|secret|token|credential", re.I)


def test_no_secret_is_in_a_manifest_a_configmap_or_the_image():
    manifests = [d for path in sorted(KUBERAY.glob("*.yaml")) for d in documents(path.name)]
    # no Secret is committed: the docs say how to make each one
    assert not [d for d in manifests if d["kind"] == "Secret"]
    for configmap in [d for d in manifests if d["kind"] == "ConfigMap"]:
        for key, text in configmap["data"].items():
            for line in text.splitlines():
                setting = line.split("#")[0]
                assert not (SECRET_WORDS.search(setting) and re.search(r"[=:]\s*\S", setting)), (
                    f"{configmap['metadata']['name']}/{key}: {line.strip()}"
                )

    # every container's secret-looking variable comes from a Secret, never a literal value
    def walk(node: Any) -> list[dict]:
        if isinstance(node, dict):
            found = [node] if "image" in node and "name" in node else []
            return found + [c for value in node.values() for c in walk(value)]
        return [c for item in node for c in walk(item)] if isinstance(node, list) else []

    containers_found = [c for d in manifests for c in walk(d)]
    assert len(containers_found) >= 4
    for container in containers_found:
        for entry in container.get("env", []):
            if SECRET_WORDS.search(entry["name"]):
                assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], entry
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    assert not [
        line
        for line in dockerfile.splitlines()
        if line.startswith(("ENV", "ARG")) and SECRET_WORDS.search(line)
    ]


def test_only_the_ray_heads_may_open_a_connection_to_mlflow(raycluster, rayjob):
    (policy,) = [d for d in documents("mlflow.yaml") if d["kind"] == "NetworkPolicy"]
    assert policy["apiVersion"] == "networking.k8s.io/v1"
    spec = policy["spec"]
    mlflow_pod = one("mlflow.yaml", "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= mlflow_pod.items()
    assert spec["policyTypes"] == ["Ingress"]
    (rule,) = spec["ingress"]
    (source,) = rule["from"]  # pods of this namespace only: no namespaceSelector, no ipBlock
    assert list(source) == ["podSelector"]
    allowed = source["podSelector"]["matchLabels"]
    assert allowed and "matchExpressions" not in source["podSelector"]
    (port,) = rule["ports"]
    assert port == {"protocol": "TCP", "port": int(mlflow_container()["ports"][0]["containerPort"])}
    for cluster_spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        head = pod_labels(cluster_spec["headGroupSpec"], "head")
        assert allowed.items() <= head.items()
        for group in cluster_spec["workerGroupSpecs"]:
            assert not allowed.items() <= pod_labels(group, "worker").items()
    assert not allowed.items() <= mlflow_pod.items()


def test_basic_auth_as_deployed_refuses_strangers_and_admits_the_driver(
    tmp_path, raycluster, monkeypatch
):
    """The Deployment's auth, run for real on loopback: its ConfigMap (user database moved
    from the volume to tmp_path), its environment with a made-up Secret; the head's
    credentials log a run; no login, or a wrong one, gets 401."""
    import requests

    from ratatouille.tracking.server import mlflow_server
    from ratatouille.tracking.store import Tracker

    secret = {
        "username": "admin",
        "password": secrets.token_urlsafe(16),
        "flask-secret-key": secrets.token_hex(16),
    }
    container = mlflow_container()
    volumes = one("mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["volumes"]
    (auth_volume,) = [v for v in volumes if "configMap" in v]
    configmap = next(
        d
        for d in documents("mlflow.yaml")
        if d["metadata"]["name"] == auth_volume["configMap"]["name"]
    )
    ini_name = Path(env(container)["MLFLOW_AUTH_CONFIG_PATH"]).name
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["db"]
    ini = configmap["data"][ini_name].replace(f"sqlite:///{mount}/", f"sqlite:///{tmp_path}/")
    (tmp_path / ini_name).write_text(ini)
    server_env = {name: secret[key] for name, (_, key) in secret_refs(container).items()}
    server_env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / ini_name)
    app = dict(itertools.pairwise(container["command"]))["--app-name"]
    backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_server(backend, tmp_path, app_name=app, env=server_env) as url:
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
        assert requests.get(search, timeout=30).status_code == 401
        wrong = requests.get(search, auth=("admin", "not-the-password"), timeout=30)
        assert wrong.status_code == 401
        head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        for name, (_, key) in secret_refs(head).items():
            monkeypatch.setenv(name, secret[key])
        tracker = Tracker("behind-auth", url)
        tracker.start_parent(str(tmp_path / "run-1"), tiny_config(tmp_path).model_dump(mode="json"))
        tracker.finish_parent()
        assert (tmp_path / "basic_auth.db").is_file()
        listed = requests.get(search, auth=(secret["username"], secret["password"]), timeout=30)
        assert listed.status_code == 200
        assert "behind-auth" in {e["name"] for e in listed.json()["experiments"]}
