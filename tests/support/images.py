"""What the Docker images are, read from docker/*.Dockerfile and scripts/versions.sh (no Docker engine needed):
shared by the image and Kubernetes checks, so that every value that must agree is read, never repeated."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = "/models/fmbc"
# engine -> (official image, build argument / scripts/versions.sh variable)
ENGINES = {
    "sglang": ("lmsysorg/sglang", "SGLANG_VERSION"),
    "vllm": ("vllm/vllm-openai", "VLLM_VERSION"),
}


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
