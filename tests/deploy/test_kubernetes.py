"""The Kubernetes manifests (docker/kubernetes/), offline: every resource validates strictly against the
Kubernetes schemas (kubernetes-validate), and every value that must match the images — image tag, command,
port, health path, model path, served name — is read from the Dockerfiles and scripts/versions.sh, not
repeated by hand."""

from __future__ import annotations

import re
from pathlib import Path

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

KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())


def image_port(engine: str) -> int:
    (expose,) = instructions(dockerfile(engine), "EXPOSE")
    return int(expose)


def image_health_path(engine: str) -> str:
    (check,) = instructions(dockerfile(engine), "HEALTHCHECK")
    return re.search(r"localhost:\d+(/[a-z]+)", check).group(1)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_strictly(path: Path, version: str) -> None:
    docs = resources(path)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


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
