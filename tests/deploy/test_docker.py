"""The Docker images, checked without a Docker engine (none in CI): hadolint, the parsed Dockerfiles against
the tested engine versions (fmbc_serve/versions.py), the compose file, and each image's install step and
default command replayed against what CI can run: the install step on the Dockerfile's own COPY set (core
suite), and, in each engine's own suite (marker `vllm` / `sglang`, run inside that engine's CPU venv), our
requirements against the engine's pins and the `--help` of the engine command `fmbc serve` starts."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser
from support.engines import require
from support.images import (
    ENGINES,
    MODEL_DIR,
    ROOT,
    default_command,
    dockerfile,
    hadolint,
    instructions,
    pip_install,
    versions,
)

from fmbc_serve.devtools.servers import free_port

PORT = 30000
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "fmbc_serve", "kernels")
# The same engines, each marked to run in its own suite (inside its venv).
IN_ENGINE_SUITE = [pytest.param(engine, marks=getattr(pytest.mark, engine)) for engine in ENGINES]
# pip options that change only output, caching or the PEP 668 guard, never what gets installed.
COSMETIC_PIP_OPTIONS = {"-q", "--quiet", "--no-cache-dir", "--no-input", "--disable-pip-version-check",
                        "--root-user-action=ignore", "--break-system-packages", "--progress-bar=off"}
HELP_TIMEOUT = 300


def pip_options_and_targets(argv: list[str]) -> tuple[set[str], list[str]]:
    rest = argv[argv.index("install") + 1:]
    return {a for a in rest if a.startswith("-")}, [a for a in rest if not a.startswith("-")]


def copy_map(parser: DockerfileParser) -> dict[str, str]:
    """COPY source (relative to the build context) -> destination in the image."""
    mapping = {}
    for value in instructions(parser, "COPY"):
        *sources, dest = shlex.split(value)
        assert not any(s.startswith("--from") for s in sources), "unexpected multi-stage COPY"
        for source in sources:
            name = source.rstrip("/")
            mapping[name] = dest.rstrip("/") + "/" + name if dest.endswith("/") and not source.endswith("/") else dest
    return mapping


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().strip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(relpath: str, patterns: list[str]) -> bool:
    """Enough of .dockerignore's matching for this file: a pattern excludes a path when it matches the path or
    one of its parents; `**/` matches at any depth. Exceptions (`!`) are not used here."""
    assert not any(p.startswith("!") for p in patterns), "update ignored() for exception patterns"
    parts = relpath.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False


def engine_venv(engine: str) -> Path:
    """The engine venv this suite runs in (scripts/test.sh runs each engine's tests inside its own venv)."""
    require(engine)
    return Path(sys.prefix)


@pytest.mark.parametrize("engine", ENGINES)
def test_hadolint_clean(engine: str) -> None:
    result = subprocess.run([hadolint(), "--no-color", str(ROOT / "docker" / f"{engine}.Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("engine", ENGINES)
def test_base_image_is_the_official_one_at_the_ci_version(engine: str) -> None:
    image, key = ENGINES[engine]
    parser = dockerfile(engine)
    assert parser.baseimage == f"{image}:v{versions()[key]}"
    assert len(parser.parent_images) == 1, "single-stage build expected"


@pytest.mark.parametrize("engine", ENGINES)
def test_dockerfile_contract(engine: str) -> None:
    parser = dockerfile(engine)
    assert instructions(parser, "EXPOSE") == [str(PORT)]
    (healthcheck,) = instructions(parser, "HEALTHCHECK")
    assert f"http://localhost:{PORT}/health" in healthcheck and "CMD" in healthcheck
    assert not instructions(parser, "ADD"), "COPY only: ADD fetches URLs and unpacks archives"
    # No secrets baked in: no token/key/password variables at all (pass them at run time).
    for name in [*parser.envs, *parser.args]:
        assert not re.search(r"TOKEN|SECRET|PASSWORD|API_KEY", name, re.I), name
    if engine == "sglang":
        assert parser.envs["SGLANG_EXTERNAL_MODEL_PACKAGE"] == "fmbc_serve.engines.sglang.models"
    command = default_command(parser)
    assert command[:2] == ["fmbc", "serve"], "the images run `fmbc serve` (metrics, FMBC_API_KEY)"
    assert command[command.index("--engine") + 1] == engine
    assert MODEL_DIR in command and command[command.index("--port") + 1] == str(PORT)
    assert command[command.index("--host") + 1] == "0.0.0.0", "a container must listen on every interface"


def test_dockerignore_keeps_sources_and_drops_local_state() -> None:
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", ".venv-sglang", "runs", "data", "fmbc_serve/__pycache__",
                 "fmbc_serve/__pycache__/cli.cpython-311.pyc", ".pytest_cache", ".ruff_cache", "fmbc_serve.egg-info"):
        assert ignored(path, patterns), f"{path} would enter the build context"
    for engine in ENGINES:
        for source in copy_map(dockerfile(engine)):
            assert not ignored(source, patterns), f"{source} is COPY'd but excluded by .dockerignore"
            for file in (ROOT / source).rglob("*.py") if (ROOT / source).is_dir() else []:
                rel = file.relative_to(ROOT).as_posix()
                assert not ignored(rel, patterns), f"{rel} would be missing from the image"


def test_compose_profiles_gpu_port_healthcheck() -> None:
    compose = yaml.safe_load((ROOT / "docker" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == set(ENGINES)
    for engine, service in services.items():
        image, key = ENGINES[engine]
        assert service["profiles"] == [engine]
        assert service["build"]["dockerfile"] == f"docker/{engine}.Dockerfile"
        assert (ROOT / "docker" / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert f":-{versions()[key]}}}" in service["build"]["args"][key], "compose default != tested version"
        assert service["environment"]["FMBC_API_KEY"] == "${FMBC_API_KEY:-}"
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert any(str(p).endswith(f":{PORT}") for p in service["ports"])
        assert any(str(v).endswith(f":{MODEL_DIR}:ro") for v in service["volumes"]), "model not mounted read-only"
        assert any("/root/.cache/huggingface" in str(v) for v in service["volumes"])
        health = service["healthcheck"]
        assert health["test"][0] in ("CMD", "CMD-SHELL") and f"localhost:{PORT}/health" in " ".join(health["test"])
        assert service["ipc"] == "host" and service["shm_size"]


def venv_sh_engine_install() -> tuple[set[str], list[str]]:
    """The `--no-deps` install of our package that scripts/venv.sh runs in each engine venv."""
    lines = [line for line in (ROOT / "scripts" / "venv.sh").read_text().splitlines()
             if "pip" in line and " install " in line and "--no-deps" in line]
    assert len(lines) == 1, lines
    argv = shlex.split(lines[0].split(">&2")[0])
    return pip_options_and_targets(argv)


@pytest.mark.parametrize("engine", ENGINES)
def test_install_step_is_the_no_deps_install_of_venv_sh(engine: str) -> None:
    parser = dockerfile(engine)
    argv = pip_install(parser)
    assert argv[argv.index("pip") - 2:argv.index("pip")] == ["python3", "-m"], "pip of the image's python3"
    options, targets = pip_options_and_targets(argv)
    ci_options, ci_targets = venv_sh_engine_install()
    assert ci_targets == ['$here'] and "--no-deps" in ci_options
    assert options - COSMETIC_PIP_OPTIONS == ci_options - COSMETIC_PIP_OPTIONS, (options, ci_options)
    # The one target is the folder the package sources were copied to: the repository root's counterpart.
    copies = copy_map(parser)
    assert set(copies) == set(PACKAGE_SOURCES)
    (target,) = targets
    assert all(copies[s].rstrip("/").startswith(target.rstrip("/")) for s in PACKAGE_SOURCES)
    assert copies["pyproject.toml"].rstrip("/") in (target.rstrip("/"), target.rstrip("/") + "/pyproject.toml")


def replay_install(engine: str, tmp_path: Path) -> Path:
    """Rebuild the image's package folder from the build context (the COPY set minus .dockerignore), then run
    the image's pip options on it with this interpreter into a target folder."""
    parser = dockerfile(engine)
    patterns = dockerignore_patterns()
    _, targets = pip_options_and_targets(pip_install(parser))
    context = tmp_path / "image" / targets[0].strip("/")
    for source, dest in copy_map(parser).items():
        dest_path = tmp_path / "image" / dest.strip("/")
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, dest_path, ignore=lambda d, names: [
                n for n in names if ignored((Path(d) / n).relative_to(ROOT).as_posix(), patterns)])
        else:
            dest_path = dest_path / source if dest.endswith("/") else dest_path
            dest_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / source, dest_path)
    options, _ = pip_options_and_targets(pip_install(parser))
    site = tmp_path / "site"
    # --no-build-isolation: the image's build fetches setuptools; here the venv's own (offline) does the build.
    command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--target", str(site),
               *sorted(options - {"--break-system-packages", "--root-user-action=ignore"}), str(context)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180,
                            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    return site


def test_image_install_contains_the_engine_plugins(tmp_path: Path) -> None:
    site = replay_install("sglang", tmp_path)
    external = dockerfile("sglang").envs["SGLANG_EXTERNAL_MODEL_PACKAGE"]
    package_dir = site.joinpath(*external.split("."))
    assert (package_dir / "__init__.py").is_file(), (
        f"{external} is not in the installed package (only in the source tree): list it in pyproject.toml's "
        "[tool.setuptools] packages")
    assert any("EntryClass" in p.read_text() for p in package_dir.glob("*.py") if p.name != "__init__.py")
    (dist_info,) = site.glob("fmbc_serve-*.dist-info")
    entry_points = (dist_info / "entry_points.txt").read_text()
    for group, target in (("vllm.general_plugins", "fmbc_serve.engines.vllm.plugin:register"),
                          ("sglang.srt.plugins", "fmbc_serve.engines.sglang.plugin:register")):
        assert f"[{group}]" in entry_points and target in entry_points, entry_points
    for module in ("fmbc_serve/engines/vllm/plugin.py", "fmbc_serve/engines/sglang/plugin.py",
                   "fmbc_serve/engines/sglang/models/fmbc.py", "fmbc_kernels/__init__.py"):
        assert (site / module).is_file(), module


REQUIREMENTS_SATISFIED = """
import json, sys
from importlib.metadata import PackageNotFoundError, distribution, version
from packaging.requirements import Requirement
problems = []
for line in json.loads(sys.argv[1]):
    req = Requirement(line)
    try:
        have = version(req.name)
    except PackageNotFoundError:
        problems.append(f"{req.name} missing")
        continue
    if not req.specifier.contains(have, prereleases=True):
        problems.append(f"{req.name} {have} does not satisfy {req.specifier}")
groups = {ep.group for ep in distribution("fmbc-serve").entry_points}
print(json.dumps({"problems": problems, "groups": sorted(groups)}))
"""


@pytest.mark.parametrize("engine", IN_ENGINE_SUITE)
def test_no_deps_install_is_safe_in_the_engine_venv(engine: str) -> None:
    """`--no-deps` leaves our requirements to the engine: every one must already be met by what the engine
    installed (as in the image, whose engine pins are the same release), and our entry points be there."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    python = engine_venv(engine) / "bin" / "python"
    requirements = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    result = subprocess.run([str(python), "-c", REQUIREMENTS_SATISFIED, json.dumps(requirements)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["problems"] == []
    assert {"vllm.general_plugins", "sglang.srt.plugins"} <= set(report["groups"])


def cpu_equivalent(engine: str, command: list[str], checkpoint: str, port: int) -> list[str]:
    """The engine server command that the image's default command (`fmbc serve ...`) starts on a GPU, built by
    `fmbc serve`'s own code in this venv: model path -> a tiny checkpoint, port -> a free port, and an API key
    as FMBC_API_KEY gives one."""
    from fmbc_serve.cli import build_parser
    from fmbc_serve.serve import engine_command, split_engine_args

    argv = [checkpoint if a == MODEL_DIR else str(port) if a == str(PORT) else a for a in command]
    assert argv[:2] == ["fmbc", "serve"], argv
    args, unknown = build_parser().parse_known_args(argv[1:])
    args.engine_args = split_engine_args(args, unknown, argv[1:])
    args.api_key = "key-from-FMBC_API_KEY"
    chosen, server, _ = engine_command(args, cuda=True)
    assert chosen == engine
    return server


def flag_names(argv: list[str]) -> set[str]:
    return {a.split("=")[0] for a in argv if a.startswith("--")}


@pytest.mark.parametrize("engine", IN_ENGINE_SUITE)
def test_default_command_accepted_by_the_engine(engine: str, tiny_checkpoints: dict[str, str], tmp_path) -> None:
    """The engine command behind the image's default command, in the CPU venv with a tiny checkpoint and a free
    port: its module imports and `--help` succeeds, and every flag it uses (API key and metrics included) is one
    the engine lists."""
    engine_venv(engine)
    argv = cpu_equivalent(engine, default_command(dockerfile(engine)), tiny_checkpoints["binary"], free_port())
    assert tiny_checkpoints["binary"] in argv and argv[argv.index("--port") + 1] != str(PORT)
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and "--api-key" in argv
    assert engine == "vllm" or "--enable-metrics" in argv
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    listing = "--help=all" if engine == "vllm" else "--help"  # `vllm serve --help` lists only the flag groups
    result = subprocess.run([*argv, listing], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=HELP_TIMEOUT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    accepted = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", result.stdout))
    assert flag_names(argv) <= accepted, f"not in {engine} --help: {flag_names(argv) - accepted}"
