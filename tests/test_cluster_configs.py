"""The data-only files under ``cluster/``: they parse, use only fields their schemas define,
and agree with each other and with the code.

* every ``*.yaml`` / ``*.yml`` parses;
* Kubernetes documents (``cluster/kuberay/``, ``cluster/monitoring/podmonitor.yaml``) use only
  the fields of an explicit allowed-field tree per kind (taken from KubeRay's ``ray.io/v1``
  Go types and the Kubernetes / Prometheus Operator APIs: the parts these files use);
* GPU worker pods ask for ``nvidia.com/gpu`` in requests and limits alike, the head for none;
  every Ray node exports metrics on 8080 and mounts the shared volume;
* the RayJob's entrypoint is a valid ``spade-train`` command whose config, with its ``--set``
  overrides, loads with ``train_job.config.load_train_config`` and matches the cluster's GPUs;
* the Serve config (``cluster/serve/``) and the RayService's ``serveConfigV2`` are the same,
  pass Ray's ``ServeDeploySchema`` (plus an unknown-key check, which Ray's models skip), and
  their ``args`` pass ``serve_app.config.ServeConfig``; the RayService's GPU group can hold
  the Serve autoscaling maximum;
* the cluster-launcher YAML passes Ray's ``ray-schema.json`` and Ray's own config checks;
* ``prometheus.yml`` scrapes the documented ports (relabelling simulated on sample targets);
* the Grafana dashboard parses and queries only the documented series.

Each checker also has a negative test, so that it can fail.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
RAYJOB = CLUSTER / "kuberay" / "rayjob-train.yaml"
RAYSERVICE = CLUSTER / "kuberay" / "rayservice.yaml"
STORAGE = CLUSTER / "kuberay" / "storage.yaml"
SERVE_YAML = CLUSTER / "serve" / "spade.yaml"
LAUNCHER = CLUSTER / "launcher" / "aws.yaml"
PROMETHEUS = CLUSTER / "monitoring" / "prometheus.yml"
PODMONITOR = CLUSTER / "monitoring" / "podmonitor.yaml"
DASHBOARD = CLUSTER / "monitoring" / "grafana-dashboard.json"

# Ray Serve's own pydantic models raise these on import (Ray's code, not ours).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.serve.*")

METRICS_EXPORT_PORT = 8080  # Ray nodes' --metrics-export-port, fixed by our docs
TRAIN_METRICS_PORT = 9464  # train_job's rank-0 Prometheus endpoint (logging.metrics_port)
MOUNT = "/mnt/spade"  # where the shared volume sits in every Ray pod
GPU = "nvidia.com/gpu"


def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]


def load_one(path: Path) -> Any:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no YAML document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is a {type(doc).__name__}, not a mapping"


def test_expected_files_exist() -> None:
    for path in (RAYJOB, RAYSERVICE, STORAGE, SERVE_YAML, LAUNCHER, PROMETHEUS, PODMONITOR, DASHBOARD):
        assert path.is_file(), f"{path.relative_to(REPO)} is missing"


# ---------------------------------------------------------------------------------------
# Allowed-field trees. A dict lists a mapping's allowed keys and what each holds; a
# one-element list is "a list of"; ANY is not checked further (free-form maps such as
# labels, rayStartParams, resource quantities, or scalars).

ANY = None
Tree = Any


def fields(names: str = "", **nested: Tree) -> dict[str, Tree]:
    """An allowed-field mapping: space-separated free-form fields, then checked sub-trees."""
    return {**dict.fromkeys(names.split(), ANY), **nested}


OBJECT_META = fields("name generateName namespace labels annotations")
RESOURCES = fields("requests limits claims")
CONTAINER = fields(
    "name image imagePullPolicy command args workingDir envFrom lifecycle livenessProbe readinessProbe"
    " startupProbe securityContext terminationMessagePolicy",
    env=[fields("name value valueFrom")],
    resources=RESOURCES,
    ports=[fields("containerPort name protocol hostPort hostIP")],
    volumeMounts=[fields("name mountPath readOnly subPath subPathExpr mountPropagation")],
)
VOLUME = fields(
    "name configMap secret hostPath csi projected ephemeral",
    persistentVolumeClaim=fields("claimName readOnly"),
    emptyDir=fields("medium sizeLimit"),
)
POD_TEMPLATE = fields(
    metadata=OBJECT_META,
    spec=fields(
        "nodeSelector affinity topologySpreadConstraints serviceAccountName securityContext imagePullSecrets"
        " priorityClassName restartPolicy terminationGracePeriodSeconds schedulerName runtimeClassName",
        containers=[CONTAINER],
        initContainers=[CONTAINER],
        volumes=[VOLUME],
        tolerations=[fields("key operator value effect tolerationSeconds")],
    ),
)
# KubeRay ray.io/v1: ray-operator/apis/ray/v1/{raycluster,rayjob,rayservice}_types.go.
RAY_CLUSTER_SPEC = fields(
    "rayVersion enableInTreeAutoscaling headServiceAnnotations suspend gcsFaultToleranceOptions",
    autoscalerOptions=fields(
        "upscalingMode idleTimeoutSeconds image imagePullPolicy env envFrom volumeMounts securityContext version",
        resources=RESOURCES,
    ),
    headGroupSpec=fields("rayStartParams serviceType headService enableIngress", template=POD_TEMPLATE),
    workerGroupSpecs=[
        fields(
            "groupName replicas minReplicas maxReplicas rayStartParams numOfHosts suspend idleTimeoutSeconds",
            template=POD_TEMPLATE,
            scaleStrategy=fields("workersToDelete"),
        )
    ],
    authOptions=fields("mode secretName"),  # KubeRay >= 1.5.1
)
RAYJOB_SPEC = fields(
    "entrypoint runtimeEnvYAML shutdownAfterJobFinishes ttlSecondsAfterFinished activeDeadlineSeconds"
    " submissionMode jobId metadata entrypointNumCpus entrypointNumGpus entrypointResources clusterSelector"
    " suspend backoffLimit deletionStrategy managedBy",
    rayClusterSpec=RAY_CLUSTER_SPEC,
    submitterPodTemplate=POD_TEMPLATE,
    submitterConfig=fields("backoffLimit"),
)
RAYSERVICE_SPEC = fields(
    "serveConfigV2 serviceUnhealthySecondThreshold deploymentUnhealthySecondThreshold excludeHeadPodFromServeSvc"
    " serveService",
    rayClusterConfig=RAY_CLUSTER_SPEC,
    upgradeStrategy=fields("type"),
)
PVC_SPEC = fields("accessModes storageClassName volumeMode volumeName selector dataSource", resources=RESOURCES)
# Prometheus Operator monitoring.coreos.com/v1.
RELABEL = fields("sourceLabels separator targetLabel regex modulus replacement action")
PODMONITOR_SPEC = fields(
    "selector namespaceSelector jobLabel podTargetLabels sampleLimit",
    podMetricsEndpoints=[
        fields(
            "port portNumber path scheme params interval scrapeTimeout honorLabels honorTimestamps",
            relabelings=[RELABEL],
            metricRelabelings=[RELABEL],
        )
    ],
)

KINDS: dict[tuple[str, str], Tree] = {
    ("ray.io/v1", "RayJob"): RAYJOB_SPEC,
    ("ray.io/v1", "RayService"): RAYSERVICE_SPEC,
    ("ray.io/v1", "RayCluster"): RAY_CLUSTER_SPEC,
    ("v1", "PersistentVolumeClaim"): PVC_SPEC,
    ("monitoring.coreos.com/v1", "PodMonitor"): PODMONITOR_SPEC,
}


def tree_errors(value: Any, tree: Tree, where: str) -> list[str]:
    """Fields of ``value`` that ``tree`` does not allow, and shape mismatches, as dotted paths."""
    if tree is ANY:
        return []
    if isinstance(tree, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in tree_errors(item, tree[0], f"{where}[{i}]")]
    if not isinstance(value, dict):
        return [f"{where}: expected a mapping, got {type(value).__name__}"]
    errors = []
    for key, item in value.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in tree:
            errors.append(f"{path}: unknown field")
        else:
            errors.extend(tree_errors(item, tree[key], path))
    return errors


def k8s_errors(doc: Any) -> list[str]:
    """Unknown kinds and fields of one Kubernetes document."""
    if not isinstance(doc, dict):
        return ["not a mapping"]
    kind = (doc.get("apiVersion"), doc.get("kind"))
    if kind not in KINDS:
        return [f"unknown apiVersion/kind {kind[0]}/{kind[1]}"]
    top = {"apiVersion": ANY, "kind": ANY, "metadata": OBJECT_META, "spec": KINDS[kind]}
    errors = tree_errors(doc, top, "")
    if "spec" not in doc:
        errors.append("spec: missing")
    return errors


def k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in yaml_files():
        in_k8s_dir = path.parent.name == "kuberay" or path == PODMONITOR
        for doc in load_docs(path):
            if in_k8s_dir or ("apiVersion" in doc and "kind" in doc):
                yield path, doc


def test_kubernetes_docs_use_known_fields() -> None:
    seen = set()
    for path, doc in k8s_docs():
        seen.add((doc.get("apiVersion"), doc.get("kind")))
        assert k8s_errors(doc) == [], f"{path.relative_to(REPO)} ({doc.get('kind')})"
    for kind in [("ray.io/v1", "RayJob"), ("ray.io/v1", "RayService"), ("v1", "PersistentVolumeClaim"),
                 ("monitoring.coreos.com/v1", "PodMonitor")]:
        assert kind in seen, f"no {kind[1]} document under cluster/"


def test_field_checker_reports_unknown_fields() -> None:
    job = load_one(RAYJOB)
    bad = copy.deepcopy(job)
    bad["spec"]["entrypointt"] = "typo"
    cluster = bad["spec"]["rayClusterSpec"]
    cluster["workerGroupSpec"] = []  # the list is workerGroupSpecs
    cluster["headGroupSpec"]["rayStartParam"] = {}
    cluster["workerGroupSpecs"][0]["maxReplica"] = 3
    cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"][0]["readonly"] = True
    assert sorted(k8s_errors(bad)) == sorted([
        "spec.entrypointt: unknown field",
        "spec.rayClusterSpec.workerGroupSpec: unknown field",
        "spec.rayClusterSpec.headGroupSpec.rayStartParam: unknown field",
        "spec.rayClusterSpec.workerGroupSpecs[0].maxReplica: unknown field",
        "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resource: unknown field",
        "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].volumeMounts[0].readonly: unknown field",
    ])

    service = copy.deepcopy(load_one(RAYSERVICE))
    service["spec"]["rayClusterSpec"] = service["spec"].pop("rayClusterConfig")  # RayJob's name, not RayService's
    assert k8s_errors(service) == ["spec.rayClusterSpec: unknown field"]

    service = copy.deepcopy(load_one(RAYSERVICE))
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"] = {"gpu": {}}
    assert k8s_errors(service) == ["spec.rayClusterConfig.workerGroupSpecs: expected a list, got dict"]

    pvc = copy.deepcopy(load_one(STORAGE))
    pvc["spec"]["accessMode"] = ["ReadWriteMany"]
    assert k8s_errors(pvc) == ["spec.accessMode: unknown field"]

    monitor = copy.deepcopy(load_docs(PODMONITOR)[0])
    monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]["source_labels"] = []
    assert k8s_errors(monitor) == ["spec.podMetricsEndpoints[0].relabelings[0].source_labels: unknown field"]

    assert k8s_errors({"apiVersion": "ray.io/v1alpha1", "kind": "RayJob", "spec": {}}) == [
        "unknown apiVersion/kind ray.io/v1alpha1/RayJob"
    ]


# ---------------------------------------------------------------------------------------
# Ray pods: GPUs, metrics port, shared volume, image


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def ray_containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def gpu_quantity(container: dict[str, Any], part: str) -> float | None:
    value = (container.get("resources") or {}).get(part, {}).get(GPU)
    return None if value is None else float(value)


def gpu_errors(spec: dict[str, Any]) -> list[str]:
    """GPU resources that Kubernetes or KubeRay would treat differently from what we mean."""
    errors = []
    for c in ray_containers(spec["headGroupSpec"]["template"]):
        if gpu_quantity(c, "requests") or gpu_quantity(c, "limits"):
            errors.append(f"head container {c['name']}: {GPU} on the head")
    gpu_groups = 0
    for group in spec.get("workerGroupSpecs", []):
        for c in ray_containers(group["template"]):
            req, lim = gpu_quantity(c, "requests"), gpu_quantity(c, "limits")
            if req is None and lim is None:
                continue
            name = f"worker group {group['groupName']} container {c['name']}"
            if req is None or lim is None:
                errors.append(f"{name}: {GPU} must be in both requests and limits (requests {req}, limits {lim})")
            elif req != lim:
                errors.append(f"{name}: {GPU} requests {req} != limits {lim}")
            elif req <= 0:
                errors.append(f"{name}: {GPU} must be > 0")
            else:
                gpu_groups += 1
    if gpu_groups == 0:
        errors.append("no worker group asks for GPUs")
    return errors


def gpus_per_pod(group: dict[str, Any]) -> float:
    return sum(gpu_quantity(c, "limits") or 0 for c in ray_containers(group["template"]))


def cpus(quantity: Any) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def ray_docs() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p, d in k8s_docs() if d["apiVersion"] == "ray.io/v1"]


def test_ray_docs_found() -> None:
    kinds = sorted(d["kind"] for _, d in ray_docs())
    assert kinds == ["RayJob", "RayService"]


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_gpu_workers_request_and_limit_gpus(kind: str) -> None:
    (doc,) = [d for _, d in ray_docs() if d["kind"] == kind]
    assert gpu_errors(cluster_spec(doc)) == []


def test_gpu_checker_reports_mismatches() -> None:
    spec = cluster_spec(load_one(RAYJOB))
    bad = copy.deepcopy(spec)
    worker = bad["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    del worker["resources"]["limits"][GPU]
    assert gpu_errors(bad) == [
        f"worker group gpu container ray-worker: {GPU} must be in both requests and limits (requests 4.0, limits None)",
        "no worker group asks for GPUs",
    ]
    bad = copy.deepcopy(spec)
    bad["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"][GPU] = 2
    assert gpu_errors(bad) == [
        f"worker group gpu container ray-worker: {GPU} requests 4.0 != limits 2.0",
        "no worker group asks for GPUs",
    ]
    bad = copy.deepcopy(spec)
    bad["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"][GPU] = 1
    assert gpu_errors(bad) == [f"head container ray-head: {GPU} on the head"]


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_ray_pods_export_metrics_and_mount_the_volume(kind: str) -> None:
    import ray

    (doc,) = [d for _, d in ray_docs() if d["kind"] == kind]
    spec = cluster_spec(doc)
    version = spec["rayVersion"]
    assert version.split(".")[:2] == ray.__version__.split(".")[:2], f"rayVersion {version} vs installed Ray {ray.__version__}"
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"

    (pvc,) = load_docs(STORAGE)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    read_only = kind == "RayService"

    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = set()
    for group in groups:
        where = group.get("groupName", "head")
        assert str(group["rayStartParams"].get("metrics-export-port")) == str(METRICS_EXPORT_PORT), where
        pod = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        for c in ray_containers(group["template"]):
            images.add(c["image"])
            ports = {p["containerPort"]: p.get("name") for p in c.get("ports", [])}
            assert ports.get(METRICS_EXPORT_PORT) == "metrics", f"{where}: container port {METRICS_EXPORT_PORT} named metrics"
            mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"] == MOUNT]
            assert len(mounts) == 1, f"{where}: {MOUNT} not mounted"
            claim = claims[mounts[0]["name"]]
            assert claim["claimName"] == pvc["metadata"]["name"], where
            assert bool(mounts[0].get("readOnly")) == read_only, where
            assert bool(claim.get("readOnly")) == read_only, where
            assert c["resources"]["requests"] == c["resources"]["limits"], (
                f"{where}: requests == limits (Ray sizes itself from them)"
            )
    assert len(images) == 1, f"head and workers must run one image, got {images}"


# ---------------------------------------------------------------------------------------
# RayJob: the entrypoint is a valid training command for this cluster


def parse_entrypoint(entrypoint: str) -> argparse.Namespace:
    """``spade-train`` / ``python -m train_job`` arguments, as train_job.__main__ defines them."""
    argv = shlex.split(entrypoint)
    if argv[:1] == ["spade-train"]:
        argv = argv[1:]
    elif argv[:3] in (["python", "-m", "train_job"], ["python3", "-m", "train_job"]):
        argv = argv[3:]
    else:
        raise ValueError(f"entrypoint must run spade-train or python -m train_job, got {argv[:3]}")
    parser = argparse.ArgumentParser(prog="spade-train", exit_on_error=False)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume")
    parser.add_argument("--address")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ValueError(f"unknown entrypoint arguments: {unknown}")
    return args


def test_spade_train_console_script_exists() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["scripts"]["spade-train"] == "train_job.__main__:main"


def test_rayjob_entrypoint_loads_and_fits_the_cluster() -> None:
    from train_job.config import load_train_config

    job = load_one(RAYJOB)
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    args = parse_entrypoint(spec["entrypoint"])
    config_path = REPO / args.config  # the image's working directory is the repository root
    assert config_path.is_file(), f"{args.config} does not exist"
    assert args.config == "cluster/configs/ade20k.yaml"
    cfg = load_train_config(config_path, args.overrides)

    assert cfg.scaling.use_gpu
    cluster = spec["rayClusterSpec"]
    gpus = 0.0
    for group in cluster["workerGroupSpecs"]:
        # A fixed-size group: the workers Ray Train waits for are all there from the start.
        assert group["minReplicas"] == group["replicas"] == group["maxReplicas"], group["groupName"]
        gpus += group["replicas"] * group.get("numOfHosts", 1) * gpus_per_pod(group)
    per_worker = cfg.scaling.worker_resources["GPU"]
    assert cfg.scaling.num_workers * per_worker == gpus, (
        f"scaling.num_workers {cfg.scaling.num_workers} x {per_worker} GPU != {gpus} GPUs in the worker groups"
    )
    for name, path in [("data.shards", cfg.data.shards), ("storage.path", cfg.storage.path),
                       ("loss.vgg_weights", cfg.loss.vgg_weights)]:
        assert path is not None and path.startswith(MOUNT + "/"), f"{name} {path} is not on the shared volume"
    # Prometheus reaches the rank-0 worker's endpoint from outside its pod.
    assert cfg.logging.metrics_host == "0.0.0.0"
    assert cfg.logging.metrics_port == TRAIN_METRICS_PORT
    for group in cluster["workerGroupSpecs"]:
        for c in ray_containers(group["template"]):
            assert TRAIN_METRICS_PORT in [p["containerPort"] for p in c.get("ports", [])]


def test_entrypoint_checks_can_fail() -> None:
    from train_job.config import load_train_config

    with pytest.raises(ValueError, match="unknown entrypoint arguments"):
        parse_entrypoint("spade-train --config cluster/configs/ade20k.yaml --sett optim.lr=1")
    with pytest.raises(ValueError, match="must run spade-train"):
        parse_entrypoint("python train.py --config cluster/configs/ade20k.yaml")
    args = parse_entrypoint(load_one(RAYJOB)["spec"]["entrypoint"])
    with pytest.raises(ValueError, match="divisible by scaling.num_workers"):
        load_train_config(REPO / args.config, [*args.overrides, "scaling.num_workers=3"])
    with pytest.raises(ValueError, match="unknown key scaling.num_gpus"):
        load_train_config(REPO / args.config, [*args.overrides, "scaling.num_gpus=8"])


# ---------------------------------------------------------------------------------------
# Serve: cluster/serve/spade.yaml and the RayService's serveConfigV2


def serve_key_errors(config: dict[str, Any]) -> list[str]:
    """Keys Ray's Serve schema does not define (its pydantic models silently drop them)."""
    from ray.serve.schema import (
        DeploymentSchema,
        HTTPOptionsSchema,
        ServeApplicationSchema,
        ServeDeploySchema,
        gRPCOptionsSchema,
    )

    def unknown(obj: Any, model: Any, where: str) -> list[str]:
        if not isinstance(obj, dict):
            return []  # wrong types are ServeDeploySchema's to report
        allowed = set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}
        return [f"{where}{k}: unknown field" for k in obj if k not in allowed]

    errors = unknown(config, ServeDeploySchema, "")
    errors += unknown(config.get("http_options"), HTTPOptionsSchema, "http_options.")
    errors += unknown(config.get("grpc_options"), gRPCOptionsSchema, "grpc_options.")
    for i, app in enumerate(config.get("applications") or []):
        errors += unknown(app, ServeApplicationSchema, f"applications[{i}].")
        deployments = app.get("deployments") if isinstance(app, dict) else None
        for j, dep in enumerate(deployments or []):
            errors += unknown(dep, DeploymentSchema, f"applications[{i}].deployments[{j}].")
    return errors


def serve_configs() -> dict[str, dict[str, Any]]:
    service = load_one(RAYSERVICE)
    return {
        "cluster/serve/spade.yaml": load_one(SERVE_YAML),
        "rayservice.yaml serveConfigV2": yaml.safe_load(service["spec"]["serveConfigV2"]),
    }


@pytest.mark.parametrize("name", list(serve_configs()))
def test_serve_config_validates_against_ray_schema(name: str) -> None:
    from ray.serve.schema import ServeDeploySchema

    config = serve_configs()[name]
    ServeDeploySchema.model_validate(config)
    assert serve_key_errors(config) == []
    assert config["http_options"]["host"] == "0.0.0.0", "the proxies must be reachable from other pods / nodes"


@pytest.mark.parametrize("name", list(serve_configs()))
def test_serve_args_validate(name: str) -> None:
    from serve_app.config import ServeConfig

    for app in serve_configs()[name]["applications"]:
        ServeConfig.from_dict(app["args"])


@pytest.mark.parametrize("name", list(serve_configs()))
def test_serve_import_path_exists(name: str) -> None:
    for app in serve_configs()[name]["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert attr, f"import_path {app['import_path']} must be module:builder"
        path = REPO / (module.replace(".", "/") + ".py")
        assert path.is_file(), f"{app['import_path']}: {path.relative_to(REPO)} does not exist (yet)"


def without_checkpoints(config: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for app in config.get("applications", []):
        app.get("args", {}).pop("checkpoint", None)
    return config


def test_rayservice_serves_the_same_config() -> None:
    local, kube = serve_configs().values()
    assert without_checkpoints(kube) == without_checkpoints(local), (
        "serveConfigV2 in cluster/kuberay/rayservice.yaml differs from cluster/serve/spade.yaml"
    )
    for app_local, app_kube in zip(local["applications"], kube["applications"], strict=True):
        checkpoint = app_kube["args"]["checkpoint"]
        if checkpoint != app_local["args"]["checkpoint"]:
            assert checkpoint.startswith(MOUNT + "/"), f"{checkpoint} is not on the mounted volume"
        if "://" not in checkpoint:
            assert checkpoint.startswith(MOUNT + "/"), f"{checkpoint}: local paths must be on the shared volume"


def test_serve_checks_can_fail() -> None:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from serve_app.config import ServeConfig

    config = load_one(SERVE_YAML)
    bad = copy.deepcopy(config)
    bad["applications"][0]["route_prefx"] = "/"
    bad["http_options"]["hots"] = "0.0.0.0"
    bad["applications"][0]["deployments"] = [{"name": "SpadeGenerator", "user_cnfig": {}}]
    assert serve_key_errors(bad) == [
        "http_options.hots: unknown field",
        "applications[0].route_prefx: unknown field",
        "applications[0].deployments[0].user_cnfig: unknown field",
    ]
    with pytest.raises(ValidationError):
        ServeDeploySchema.model_validate({**config, "applications": "spade"})
    with pytest.raises(ValueError, match="batching"):
        ServeConfig.from_dict({**config["applications"][0]["args"], "batching": {"max_batch_size": 0}})
    with pytest.raises(ValueError):
        ServeConfig.from_dict({**config["applications"][0]["args"], "unknown_key": 1})
    different = copy.deepcopy(config)
    different["applications"][0]["args"]["precision"] = "fp32"
    assert without_checkpoints(different) != without_checkpoints(config)


def test_rayservice_autoscales_enough_gpu_pods() -> None:
    from serve_app.config import ServeConfig

    service = load_one(RAYSERVICE)
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["autoscalerOptions"]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    args = ServeConfig.from_dict(app["args"])
    deployments = [args.generator, args.encoder, args.ingress]

    groups = cluster["workerGroupSpecs"]
    for g in groups:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], g["groupName"]

    def capacity(count: str, resource: str) -> float:
        total = 0.0
        for g in groups:
            per_pod = sum(
                cpus(c["resources"]["limits"].get("cpu", 0)) if resource == "CPU" else (gpu_quantity(c, "limits") or 0)
                for c in ray_containers(g["template"])
            )
            total += g[count] * g.get("numOfHosts", 1) * per_pod
        return total

    def need(bound: str, resource: str) -> float:
        return sum(
            getattr(d.autoscaling, bound) * (d.num_gpus if resource == "GPU" else d.num_cpus) for d in deployments
        )

    # Totals only (packing can need more): the maximum the Serve autoscaler may ask for must
    # fit under maxReplicas, the minimum should already fit in minReplicas.
    for resource in ("GPU", "CPU"):
        assert need("max_replicas", resource) <= capacity("maxReplicas", resource), resource
        assert need("min_replicas", resource) <= capacity("minReplicas", resource), resource


# ---------------------------------------------------------------------------------------
# Cluster launcher: Ray's own schema


def ray_launcher_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text(encoding="utf-8"))


def schema_key_errors(value: Any, schema: dict[str, Any], root: dict[str, Any], where: str = "") -> list[str]:
    """Keys the JSON schema does not allow (additionalProperties: false), recursively.

    A fallback for when ``jsonschema`` is missing; it runs always, so that it is tested.
    """
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/definitions/"), ref
        schema = root["definitions"][ref.split("/")[-1]]
    if not isinstance(value, dict):
        return []
    props = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    errors = []
    for key, item in value.items():
        path = f"{where}.{key}" if where else str(key)
        if key in props:
            errors += schema_key_errors(item, props[key], root, path)
            continue
        matched = [s for p, s in patterns.items() if re.search(p, key)]
        if matched:
            errors += schema_key_errors(item, matched[0], root, path)
        elif schema.get("additionalProperties") is False:
            errors.append(f"{path}: unknown field")
    return errors


def test_launcher_validates_against_ray_schema() -> None:
    config = load_one(LAUNCHER)
    schema = ray_launcher_schema()
    assert schema_key_errors(config, schema, schema) == []
    for key in schema.get("required", []):
        assert key in config, f"missing {key}"
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - the venv has it
        pass
    else:
        jsonschema.validate(config, schema)
    # What `ray up` does before anything else: defaults merged, then the schema again.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_launcher_cluster_fits_training() -> None:
    import ray

    from train_job.config import load_train_config

    config = load_one(LAUNCHER)
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not head["resources"].get("GPU"), "the head is a CPU node"
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, name
    max_gpus = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_types.values())
    assert sum(t["max_workers"] for t in gpu_types.values()) <= config["max_workers"]
    ade20k = load_train_config(CLUSTER / "configs" / "ade20k.yaml")
    assert ade20k.scaling.num_workers * ade20k.scaling.worker_resources["GPU"] <= max_gpus

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, key
        for command in starts:
            assert f"--metrics-export-port={METRICS_EXPORT_PORT}" in command, key
    assert any("pip install" in c and "-e" in shlex.split(c) for c in config["setup_commands"]), "the repo is not installed"
    assert "." in config["file_mounts"].values(), "the repository is not copied to the nodes"
    image = config["docker"]["image"]
    major_minor = ".".join(ray.__version__.split(".")[:2])
    assert image.startswith(f"rayproject/ray:{major_minor}.") and "py311" in image, image


def test_launcher_checks_can_fail() -> None:
    import jsonschema

    schema = ray_launcher_schema()
    bad = copy.deepcopy(load_one(LAUNCHER))
    bad["idle_timeout_minute"] = 5
    bad["available_node_types"]["gpu_worker"]["max_worker"] = 3
    bad["auth"]["ssh_usr"] = "ubuntu"
    assert sorted(schema_key_errors(bad, schema, schema)) == [
        "auth.ssh_usr: unknown field",
        "available_node_types.gpu_worker.max_worker: unknown field",
        "idle_timeout_minute: unknown field",
    ]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    wrong_type = copy.deepcopy(load_one(LAUNCHER))
    wrong_type["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong_type, schema)


# ---------------------------------------------------------------------------------------
# Prometheus


SCRAPE_KEYS = {
    "job_name", "scrape_interval", "scrape_timeout", "metrics_path", "scheme", "params", "honor_labels",
    "honor_timestamps", "static_configs", "file_sd_configs", "kubernetes_sd_configs", "dns_sd_configs",
    "ec2_sd_configs", "relabel_configs", "metric_relabel_configs", "basic_auth", "authorization",
    "tls_config", "sample_limit",
}
RELABEL_KEYS = {"source_labels", "separator", "target_label", "regex", "modulus", "replacement", "action"}


def prometheus_errors(config: dict[str, Any]) -> list[str]:
    errors = [f"{k}: unknown top-level key" for k in config if k not in {"global", "scrape_configs", "rule_files", "alerting"}]
    names = [job.get("job_name") for job in config.get("scrape_configs", [])]
    if len(set(names)) != len(names):
        errors.append(f"duplicate job names {names}")
    for job in config.get("scrape_configs", []):
        errors += [f"{job.get('job_name')}.{k}: unknown key" for k in job if k not in SCRAPE_KEYS]
        for rule in job.get("relabel_configs", []) + job.get("metric_relabel_configs", []):
            errors += [f"{job.get('job_name')} relabel.{k}: unknown key" for k in rule if k not in RELABEL_KEYS]
    return errors


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' replace / keep / drop relabelling (anchored RE2 regexes), for checking rules."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            # Prometheus' $1 / ${1} references are Python's \g<1>.
            template = re.sub(r"\$\{(\d+)\}|\$(\d+)", r"\\g<\1\2>", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(template)
    return labels


def scraped_addresses(job: dict[str, Any], discovered: list[str]) -> list[str]:
    """What ``job`` scrapes given Ray's service-discovery targets (``discovered``)."""
    targets = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
    if job.get("file_sd_configs"):
        targets += discovered
    out = []
    for t in targets:
        labels = relabel({"__address__": t, "job": "ray"}, job.get("relabel_configs", []))
        if labels is not None:
            out.append(labels["__address__"])
    return out


# What Ray writes to prom_metrics_service_discovery.json: every node's metrics export port,
# then the autoscaler's and the dashboard's metrics ports.
RAY_DISCOVERY = ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.1:44217", "10.0.0.1:44227"]


def test_prometheus_scrapes_documented_ports() -> None:
    config = load_one(PROMETHEUS)
    assert prometheus_errors(config) == []
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for job in jobs.values():
        for sd in job.get("file_sd_configs", []):
            for f in sd["files"]:
                assert f.endswith("/prom_metrics_service_discovery.json"), f"{f}: not Ray's discovery file"

    ray_targets = scraped_addresses(jobs["ray"], RAY_DISCOVERY)
    assert {"10.0.0.1:8080", "10.0.0.2:8080"} <= set(ray_targets)
    train = jobs["spade-train"]
    assert scraped_addresses(train, RAY_DISCOVERY) == ["10.0.0.1:9464", "10.0.0.2:9464"]
    final = relabel({"__address__": "10.0.0.1:8080", "job": "ray"}, train["relabel_configs"])
    assert final is not None and final["job"] == "spade-train"

    ports = {int(a.rsplit(":", 1)[1]) for job in jobs.values() for a in scraped_addresses(job, RAY_DISCOVERY)}
    assert {METRICS_EXPORT_PORT, TRAIN_METRICS_PORT} <= ports


def test_prometheus_checks_can_fail() -> None:
    config = load_one(PROMETHEUS)
    bad = copy.deepcopy(config)
    bad["scrape_configs"][1]["relabel_config"] = []
    bad["scrape_configs"][1]["relabel_configs"][0]["sourcelabels"] = []
    bad["scrape_configs"].append({"job_name": "ray"})
    assert sorted(prometheus_errors(bad)) == sorted([
        "spade-train.relabel_config: unknown key",
        "spade-train relabel.sourcelabels: unknown key",
        "duplicate job names ['ray', 'spade-train', 'ray']",
    ])
    wrong = copy.deepcopy({j["job_name"]: j for j in config["scrape_configs"]}["spade-train"])
    wrong["relabel_configs"][1]["replacement"] = "${1}:9090"
    assert scraped_addresses(wrong, RAY_DISCOVERY) == ["10.0.0.1:9090", "10.0.0.2:9090"]


def test_podmonitors_scrape_the_named_ports() -> None:
    monitors = load_docs(PODMONITOR)
    ports = {ep["port"] for m in monitors for ep in m["spec"]["podMetricsEndpoints"]}
    assert ports == {"metrics", "train-metrics"}
    named = {}
    for _, doc in ray_docs():
        spec = cluster_spec(doc)
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            for c in ray_containers(group["template"]):
                named.update({p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p})
    assert named["metrics"] == METRICS_EXPORT_PORT
    assert named["train-metrics"] == TRAIN_METRICS_PORT
    # Each selector matches the pods it is meant for.
    pods = []  # (kind, node type, pod labels)
    for _, doc in ray_docs():
        spec = cluster_spec(doc)
        pods.append((doc["kind"], "head", spec["headGroupSpec"]["template"]["metadata"]["labels"]))
        pods += [(doc["kind"], "worker", g["template"]["metadata"]["labels"]) for g in spec["workerGroupSpecs"]]
    selected = {}
    for m in monitors:
        wanted = dict(m["spec"]["selector"]["matchLabels"])
        node_type = wanted.pop("ray.io/node-type", None)  # KubeRay sets it on every Ray pod
        selected[m["metadata"]["name"]] = {
            (kind, t) for kind, t, labels in pods if wanted.items() <= labels.items() and node_type in (None, t)
        }
    assert selected == {
        "spade-ray-nodes": {("RayJob", "head"), ("RayJob", "worker"), ("RayService", "head"), ("RayService", "worker")},
        "spade-train-rank0": {("RayJob", "worker")},
    }


# ---------------------------------------------------------------------------------------
# Grafana

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
TRAIN_SERIES = {  # train_job/metrics.py, on the rank-0 worker
    "spade_train_steps_total": COUNTER,
    "spade_train_images_total": COUNTER,
    "spade_train_loss": GAUGE,
    "spade_train_images_per_second": GAUGE,
    "spade_train_step_seconds": HISTOGRAM,
    "spade_train_data_wait_seconds": HISTOGRAM,
    "spade_train_learning_rate": GAUGE,
    "spade_train_epoch": GAUGE,
    "spade_train_workers": GAUGE,
    "spade_train_eval": GAUGE,
}
SERVE_SERIES = {  # serve_app's ray.util.metrics, with Ray's ray_ prefix
    "ray_spade_serve_requests_total": COUNTER,
    "ray_spade_serve_request_latency_seconds": HISTOGRAM,
    "ray_spade_serve_batch_size": HISTOGRAM,
    "ray_spade_serve_queue_wait_seconds": HISTOGRAM,
    "ray_spade_serve_inference_seconds": HISTOGRAM,
    "ray_spade_serve_replicas": GAUGE,
    "ray_spade_serve_model_loads_total": COUNTER,
    "ray_spade_serve_model_load_failures_total": COUNTER,
    "ray_spade_serve_replica_failures_total": COUNTER,
    "ray_spade_serve_cancelled_requests_total": COUNTER,
    "ray_spade_serve_computed_requests_total": COUNTER,
}
RAY_SERVE_SERIES = {  # Ray Serve's own (ray/serve/_private in Ray 2.60)
    "ray_serve_num_http_requests_total": COUNTER,
    "ray_serve_num_http_error_requests_total": COUNTER,
    "ray_serve_http_request_latency_ms": HISTOGRAM,
    "ray_serve_deployment_replica_healthy": GAUGE,
    "ray_serve_deployment_processing_latency_ms": HISTOGRAM,
    "ray_serve_replica_processing_queries": GAUGE,
}


def series_names(documented: dict[str, str]) -> set[str]:
    """The names Prometheus stores: histograms as _bucket / _sum / _count."""
    names = set()
    for name, kind in documented.items():
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"} if kind == HISTOGRAM else {name}
    return names


KNOWN_SERIES = series_names(TRAIN_SERIES) | series_names(SERVE_SERIES) | series_names(RAY_SERVE_SERIES)
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                   "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (not functions, labels, keywords or numbers)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    def panels(ps: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    return [(p["title"], t["expr"]) for p in panels(dashboard["panels"]) for t in p.get("targets", [])]


def unknown_series(dashboard: dict[str, Any]) -> list[str]:
    return sorted({f"{title}: {n}" for title, expr in dashboard_exprs(dashboard) for n in metric_names(expr) - KNOWN_SERIES})


def test_train_series_match_train_job_metrics() -> None:
    source = (REPO / "train_job" / "metrics.py").read_text(encoding="utf-8")
    declared = {name: kind.lower() for kind, name in re.findall(r'prom\.(Counter|Gauge|Histogram)\(\s*"(\w+)"', source)}
    assert declared == TRAIN_SERIES


def test_serve_series_match_serve_app_metrics() -> None:
    source = (REPO / "serve_app" / "metrics.py").read_text(encoding="utf-8")
    declared = {}
    for kind, name in re.findall(r'\b(Counter|Gauge|Histogram)\(\s*(?:name=)?"(\w+)"', source):
        # Ray's exporter adds the ray_ prefix, and _total to counters.
        declared[f"ray_{name}_total" if kind == "Counter" else f"ray_{name}"] = kind.lower()
    assert declared == SERVE_SERIES


def test_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    for key in ("title", "uid", "panels", "schemaVersion"):
        assert key in dashboard, key
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] != "row":
            assert p.get("targets"), f"{p['title']}: no query"
            assert all(t.get("expr") and t.get("refId") for t in p["targets"]), p["title"]

    assert unknown_series(dashboard) == []
    used = {n for _, expr in dashboard_exprs(dashboard) for n in metric_names(expr)}
    for documented in (TRAIN_SERIES, SERVE_SERIES):
        for name, kind in documented.items():
            forms = {f"{name}_bucket"} if kind == HISTOGRAM else {name}
            assert forms & used, f"the dashboard never shows {name}"
    assert any(n.startswith("ray_serve_") for n in used), "no Ray Serve built-in series"
    # Percentiles of every histogram: p50 and p95 for training, p50 and p99 for serving.
    exprs = [expr for _, expr in dashboard_exprs(dashboard)]
    for documented, qs in ((TRAIN_SERIES, ("0.5", "0.95")), (SERVE_SERIES, ("0.5", "0.99"))):
        for name, kind in documented.items():
            if kind == HISTOGRAM and name != "ray_spade_serve_batch_size":  # shown as a distribution (heatmap)
                for q in qs:
                    assert any(e.startswith(f"histogram_quantile({q},") and f"{name}_bucket" in e for e in exprs), (name, q)


def test_metric_name_checker_can_fail() -> None:
    assert metric_names(
        'histogram_quantile(0.99, sum by (le, route) (rate(ray_spade_serve_request_latency_seconds_bucket{route="/v1/x"}[5m]))) * 1e3'
    ) == {"ray_spade_serve_request_latency_seconds_bucket"}
    joined = "sum by (deployment) (ray_spade_serve_replicas) / on (deployment) group_left ray_serve_deployment_replica_healthy"
    assert metric_names(joined) == {"ray_spade_serve_replicas", "ray_serve_deployment_replica_healthy"}
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    bad = copy.deepcopy(dashboard)
    target = next(p for p in bad["panels"] if p["type"] != "row")["targets"][0]
    target["expr"] = "spade_train_los + rate(ray_spade_serve_latency_seconds_bucket[5m]) + ray_spade_serve_batch_size"
    title = next(p for p in bad["panels"] if p["type"] != "row")["title"]
    assert unknown_series(bad) == sorted(
        f"{title}: {n}" for n in ("spade_train_los", "ray_spade_serve_latency_seconds_bucket", "ray_spade_serve_batch_size")
    )
