"""SGLang runner: offline greedy decoding for parity checks (`fmbc parity --engine sglang`) and the server
command for `fmbc serve`, with the flags that work on a CPU-only machine (see docs/sglang.md) or SGLang's
defaults on CUDA. Call `greedy` from a script under an `if __name__ == "__main__":` guard: the engine spawns
its scheduler processes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from fmbc_serve.parity import Completion

# Flags that run SGLang 0.5.23 from PyPI on a machine without a GPU (its own CPU engine needs a kernel
# library that PyPI does not ship). float32 keeps logprobs comparable with the float32 reference.
CPU_ENGINE_ARGS: dict[str, object] = {
    "device": "cpu",
    "attention_backend": "torch_native",
    "disable_overlap_schedule": True,
    "cuda_graph_backend_decode": "disabled",
    "cuda_graph_backend_prefill": "disabled",
    "dtype": "float32",
    "skip_server_warmup": True,
}


def cpu_server_flags(kv_tokens: int = 4096) -> list[str]:
    """The same CPU settings as `launch_server` flags (used by `fmbc serve`, the tests and the docs)."""
    flags: list[str] = []
    for key, value in {**CPU_ENGINE_ARGS, "max_total_tokens": kv_tokens}.items():
        flag = "--" + key.replace("_", "-")
        flags += [flag] if value is True else [flag, str(value)]
    return flags


def engine_args(checkpoint_dir: str | Path, kv_tokens: int) -> dict[str, object]:
    """sglang.Engine keyword arguments for the checkpoint: on a machine without CUDA, the CPU flags and a KV
    cache of `kv_tokens` (SGLang would otherwise take most of the RAM for it, which takes long to allocate)."""
    import torch

    args: dict[str, object] = {"model_path": str(checkpoint_dir)}
    if not torch.cuda.is_available():
        args.update(CPU_ENGINE_ARGS, max_total_tokens=max(4096, kv_tokens))
    return args


def greedy(checkpoint_dir: str | Path, prompts: list[list[int]], max_new_tokens: int, **overrides
           ) -> list[Completion]:
    """Greedy-decode each token-id prompt with SGLang's offline Engine (`overrides`: Engine arguments, e.g.
    dtype="bfloat16"): the generated ids, their logprobs, and the logprobs SGLang assigns to the prompt's own
    tokens at positions 1.. (position 0 has no prediction). `ignore_eos` keeps every output exactly
    `max_new_tokens` long, so the comparison with a reference does not depend on stop tokens."""
    import sglang

    kv_tokens = sum(len(p) + max_new_tokens for p in prompts)
    engine = sglang.Engine(**{**engine_args(checkpoint_dir, kv_tokens), **overrides}, log_level="error")
    try:
        outputs = engine.generate(
            input_ids=[list(p) for p in prompts],
            sampling_params={"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True},
            return_logprob=True,
            logprob_start_len=0,
        )
    finally:
        engine.shutdown()
    return [completion_from_meta(out["meta_info"]) for out in outputs]


def completion_from_meta(meta: dict) -> Completion:
    """A Completion from the `meta_info` of an SGLang answer given `return_logprob` and `logprob_start_len=0`
    (the offline Engine's and the server's /generate answer alike)."""
    output = meta["output_token_logprobs"]
    return Completion([token for _, token, _ in output], [logprob for logprob, _, _ in output],
                      [logprob for logprob, _, _ in meta["input_token_logprobs"][1:]])


def server_command(model: str, host: str, port: int, served_name: str, cuda: bool, python: str = sys.executable,
                   engine_args: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """SGLang's own server command (with the CPU flags where there is no CUDA) followed by ENGINE_ARGS, and its
    extra environment. Prometheus `/metrics` is on, as it is by default in vLLM."""
    command = [python, "-m", "sglang.launch_server", "--model-path", model,
               "--served-model-name", served_name, "--host", host, "--port", str(port), "--enable-metrics"]
    return command + ([] if cuda else cpu_server_flags()) + list(engine_args), {}
