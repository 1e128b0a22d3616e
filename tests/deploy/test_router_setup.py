"""The router's setup in its three places agrees, offline: the one-machine recipe (examples/router.sh, which
tests/engines/test_router.py runs), the router image (docker/router.Dockerfile) and the Kubernetes manifest
(docker/kubernetes/router.yaml) use the router release CI tests (fmbc_serve/versions.py) with the same routing,
health-check and circuit-breaker flags; in the vLLM suite, the installed router accepts every flag they use."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from support.engines import require
from support.images import ROOT, by_kind, dockerfile, exec_form, hadolint, instructions, pip_install

from fmbc_serve.versions import VLLM_ROUTER_VERSION

RECIPE = ROOT / "examples" / "router.sh"
# Where the router listens and how it finds the workers: a matter of each deployment, not of the setup.
DEPLOYMENT_FLAGS = {"--host", "--port", "--worker-urls", "--service-discovery", "--selector",
                    "--service-discovery-port", "--service-discovery-namespace", "--prometheus-host",
                    "--prometheus-port", "--log-level"}


def recipe_router_command() -> list[str]:
    """The router command of examples/router.sh, as argv (its shell variables left unexpanded)."""
    lines = RECIPE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "vllm_router.launch_router" in line)
    command = []
    for line in lines[start:]:
        command.append(line.rstrip("\\ "))
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(command).rstrip("&"))


def manifest_router_args() -> list[str]:
    (container,) = by_kind("Deployment")["fmbc-router"]["spec"]["template"]["spec"]["containers"]
    return container["args"]


def options(argv: list[str]) -> dict[str, str | None]:
    """--flag -> its value (`--flag value` or `--flag=value`; None for a switch)."""
    found: dict[str, str | None] = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, _, value = arg.partition("=")
            following = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
            found[name] = value or following
    return found


def setup_flags(argv: list[str]) -> dict[str, str | None]:
    return {name: value for name, value in options(argv).items() if name not in DEPLOYMENT_FLAGS}


def test_manifest_uses_the_recipes_router_flags() -> None:
    recipe = setup_flags(recipe_router_command())
    assert recipe["--policy"] == "round_robin" and "--cb-timeout-duration-secs" in recipe
    assert setup_flags(manifest_router_args()) == recipe


def test_router_image_installs_the_tested_router() -> None:
    parser = dockerfile("router")
    assert parser.args["VLLM_ROUTER_VERSION"] == VLLM_ROUTER_VERSION
    argv = pip_install(parser)
    assert argv[:4] == ["python3", "-m", "pip", "install"] and "vllm-router==${VLLM_ROUTER_VERSION}" in argv
    assert exec_form(parser, "ENTRYPOINT") == ["vllm-router"]  # Kubernetes passes only the flags
    assert "30000" in instructions(parser, "EXPOSE")[0].split()
    (healthcheck,) = instructions(parser, "HEALTHCHECK")
    assert "http://localhost:30000/liveness" in healthcheck
    assert instructions(parser, "USER") and not instructions(parser, "USER")[-1].startswith(("0", "root"))
    result = subprocess.run([hadolint(), "--no-color", str(ROOT / "docker" / "router.Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("argv", "env", "message"), [
    ([], {}, "usage: bash examples/router.sh DIR PORT"),
    (["/nonexistent", "30000"], {}, "/nonexistent is not a checkpoint folder (no config.json)"),
    ([str(ROOT), "not-a-port"], {}, "usage: bash examples/router.sh DIR PORT"),
    ([str(ROOT), "30000"], {"REPLICA_URLS": "http://198.18.0.1:30000"}, "usage: bash examples/router.sh DIR PORT"),
    (["not-a-port"], {"REPLICA_URLS": "http://198.18.0.1:30000"}, "usage: bash examples/router.sh DIR PORT"),
    (["30000"], {"REPLICA_URLS": "http://198.18.0.1:30000", "PYTHON": "/nonexistent/python"},
     "cannot import vllm_router: set PYTHON"),
])
def test_recipe_refuses_bad_arguments(argv: list[str], env: dict[str, str], message: str) -> None:
    """Wrong arguments (with REPLICA_URLS, the port alone) or an unusable PYTHON: exit 2 and one line naming it."""
    result = subprocess.run(["bash", str(RECIPE), *argv], capture_output=True, text=True, timeout=60,
                            env={**os.environ, **env})
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.vllm
def test_installed_router_is_the_tested_one_and_accepts_every_flag() -> None:
    """The router the vLLM environment has (pyproject's `router` extra) is the tested release, and its own
    `--help` lists every flag of the recipe and the manifest."""
    require("vllm_router")
    assert version("vllm-router") == VLLM_ROUTER_VERSION
    result = subprocess.run([sys.executable, "-m", "vllm_router.launch_router", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    accepted = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", result.stdout))
    used = set(options(recipe_router_command())) | set(options(manifest_router_args()))
    assert used <= accepted, f"not in vllm-router --help: {used - accepted}"
    assert Path(sys.executable).with_name("vllm-router").exists()  # the image's entrypoint
