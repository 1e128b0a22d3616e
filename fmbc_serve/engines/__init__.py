"""One room per engine: `vllm/` and `sglang/`, each with its plugin (registration), its model class and its
runner (offline greedy decoding and the server command, with the settings a CPU-only machine needs).
`fmbc_serve.parity` and `fmbc_serve.serve` only pick a runner by engine name."""

from __future__ import annotations

import importlib
from types import ModuleType

ENGINES = ("vllm", "sglang")


def runner(engine: str) -> ModuleType:
    """The engine's runner module: `greedy(checkpoint, prompts, max_new_tokens)` and `server_command(...)`."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    return importlib.import_module(f"fmbc_serve.engines.{engine}.runner")
