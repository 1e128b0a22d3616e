"""The Kubernetes manifests (docker/kubernetes/), offline: every resource validates strictly against the
Kubernetes schemas (kubernetes-validate), and every value that must match the images — image tag, command,
port, health path, model path, served name — is read from the Dockerfiles and scripts/versions.sh, not
repeated by hand."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
from support.images import (
    ENGINES,
    MANIFESTS,
    MODEL_DIR,
    by_kind,
    default_command,
    dockerfile,
    instructions,
    resources,
    versions,
)

from fmbc_serve.versions import VLLM_ROUTER_VERSION

SCHEMAS = Path(__file__).parent / "schemas"
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def image_port(engine: str) -> int:
    (expose,) = instructions(dockerfile(engine), "EXPOSE")
    return int(expose)


def image_health_path(engine: str) -> str:
    (check,) = instructions(dockerfile(engine), "HEALTHCHECK")
    return re.search(r"localhost:\d+(/[a-z]+)", check).group(1)


def closed(schema: dict) -> dict:
    """SCHEMA with unknown fields refused wherever it lists the known ones, as the API server's strict field
    validation does (a CRD's structural schema would silently prune them)."""
    schema = {key: closed(value) if isinstance(value, dict) else value for key, value in schema.items()}
    if "properties" in schema:
        schema["properties"] = {name: closed(sub) for name, sub in schema["properties"].items()}
        schema.setdefault("additionalProperties", False)
    if isinstance(schema.get("items"), dict):
        schema["items"] = closed(schema["items"])
    return schema


def validate_leaderworkerset(doc: dict, version: str) -> None:
    """Against LWS's own CRD schema (checked in, source in its $comment), each pod template as a Pod."""
    schema = json.loads((SCHEMAS / "leaderworkerset.x-k8s.io_v1.json").read_text())
    jsonschema.validate(doc, closed(schema))
    template = doc["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):
        metadata = {"name": role.lower(), **template[role].get("metadata", {})}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": template[role]["spec"]}
        kubernetes_validate.validate(pod, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_strictly(path: Path, version: str) -> None:
    docs = resources(path)
    assert docs
    for doc in docs:
        if doc["apiVersion"] == "leaderworkerset.x-k8s.io/v1":
            validate_leaderworkerset(doc, version)
        else:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_validation_refuses_what_kubernetes_would() -> None:
    """The LWS check is not a rubber stamp: an unknown field, a wrong type, a bad pod template are refused."""
    (good,) = by_kind("LeaderWorkerSet").values()
    for mutate in (lambda d: d["spec"].update(replica=1), lambda d: d["spec"].update(replicas="one"),
                   lambda d: d["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0].update(
                       imagePullPolicy=3)):
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
            validate_leaderworkerset(bad, KUBERNETES_VERSIONS[0])


def test_multi_node_set_runs_the_tested_flags_on_the_image() -> None:
    """The leader serves, the worker is `--headless`; both run `fmbc serve` on the vLLM image with the multi-node
    flags tests/engines/test_multi_host.py runs, the node rank and head address from LWS."""
    (lws,) = by_kind("LeaderWorkerSet").values()
    template = lws["spec"]["leaderWorkerTemplate"]
    (leader,) = template["leaderTemplate"]["spec"]["containers"]
    (worker,) = template["workerTemplate"]["spec"]["containers"]
    image_args = default_command(dockerfile("vllm"))
    for container in (leader, worker):
        assert container["image"] == f"fmbc-serve-vllm:{versions()['VLLM_VERSION']}"
        args = container["args"]
        assert args[:5] == image_args[:5]  # fmbc serve /models/fmbc --engine vllm
        flag = {name: args[i + 1] for i, name in enumerate(args[:-1]) if name.startswith("--")}
        assert flag["--nnodes"] == "$(LWS_GROUP_SIZE)" and flag["--node-rank"] == "$(LWS_WORKER_INDEX)"
        assert flag["--master-addr"] == "$(LWS_LEADER_ADDRESS)" and flag["--distributed-executor-backend"] == "mp"
    assert "--headless" in worker["args"] and "--headless" not in leader["args"]
    assert template["size"] == 2
    port = image_port("vllm")
    assert leader["ports"][0] == {"name": "http", "containerPort": port}
    assert leader["readinessProbe"]["httpGet"] == {"path": image_health_path("vllm"), "port": "http"}
    service = by_kind("Service")["fmbc-vllm-multi-node"]
    assert service["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": lws["metadata"]["name"],
                                           "role": template["leaderTemplate"]["metadata"]["labels"]["role"]}


@pytest.mark.parametrize("engine", ENGINES)
def test_worker_deployment_matches_the_image(engine: str) -> None:
    deployment = by_kind("Deployment")[f"fmbc-{engine}"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    key = ENGINES[engine][1]
    assert container["image"] == f"fmbc-serve-{engine}:{versions()[key]}"
    assert container["args"] == default_command(dockerfile(engine))  # the image's own command, unchanged
    (api_key,) = container["env"]
    assert api_key["name"] == "FMBC_API_KEY" and api_key["valueFrom"]["secretKeyRef"]["optional"] is True
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == image_port(engine)
    port = image_port(engine)
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": image_health_path(engine), "port": "http"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert MODEL_DIR.startswith(mounts["models"]["mountPath"] + "/") and mounts["models"]["readOnly"]
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] in by_kind("PersistentVolumeClaim")
    assert mounts["shm"]["mountPath"] == "/dev/shm" and volumes["shm"]["emptyDir"]["medium"] == "Memory"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = by_kind("Service")[f"fmbc-{engine}-workers"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["port"] == port


def test_router_finds_the_workers_and_serves_on_the_image_port() -> None:
    router = by_kind("Deployment")["fmbc-router"]
    (container,) = router["spec"]["template"]["spec"]["containers"]
    assert container["image"] == f"fmbc-serve-router:{VLLM_ROUTER_VERSION}"  # docker/router.Dockerfile
    args = container["args"]  # the image's entrypoint is vllm-router: flags only
    assert args[0].startswith("--") and "--service-discovery" in args
    selector = dict([args[args.index("--selector") + 1].split("=")])
    option = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--") and "=" in a}
    for engine in ENGINES:
        worker_labels = by_kind("Deployment")[f"fmbc-{engine}"]["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= worker_labels.items()
        assert int(option["--service-discovery-port"]) == image_port(engine)
        assert option["--health-check-endpoint"] == image_health_path(engine)
    assert int(option["--port"]) == container["ports"][0]["containerPort"] == image_port("vllm")
    annotations = router["spec"]["template"]["metadata"]["annotations"]
    assert int(option["--prometheus-port"]) == int(annotations["prometheus.io/port"]) == container["ports"][1][
        "containerPort"] and option["--prometheus-host"] == "0.0.0.0"
    role = by_kind("Role")["fmbc-router"]
    assert {"get", "list", "watch"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["pods"]
    assert router["spec"]["template"]["spec"]["serviceAccountName"] == by_kind("RoleBinding")["fmbc-router"][
        "subjects"][0]["name"]
    service = by_kind("Service")["fmbc"]
    assert service["spec"]["selector"].items() <= router["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == image_port("vllm")


def test_model_volume_is_filled_where_the_images_read_it() -> None:
    job = by_kind("Job")["fmbc-models-init"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    mount = container["volumeMounts"][0]["mountPath"]
    assert f'pathlib.Path("{MODEL_DIR}")' in container["command"][-1] and MODEL_DIR.startswith(mount + "/")
    assert container["image"] == f"fmbc-serve-vllm:{versions()['VLLM_VERSION']}"
