"""SGLang plugin: registers FMBC models and validates requests for them.

SGLang calls `register()` through the `sglang.srt.plugins` entry point in its launcher, scheduler and
detokenizer processes, so `python -m sglang.launch_server --model-path DIR` serves an FMBC checkpoint with no
environment variable (the alternative, `SGLANG_EXTERNAL_MODEL_PACKAGE=fmbc_serve.engines.sglang.models`, also
works).

Validation, for FMBC checkpoints only (config.json `model_type` "fmbc"), installed with SGLang's HookRegistry
in the process that runs the TokenizerManager; a rejected request gets HTTP 400 with the message below and
the server keeps serving:
- a token-id prompt with any id outside [0, vocab_size) (negative, = V, or huge): a fixed binary code would
  silently encode a token that does not exist, and a learned table would index out of bounds;
- n (parallel samples per prompt) below 1 or above `FMBC_MAX_N` (default 64), and more than
  `FMBC_MAX_SEQUENCES` (default 1024) sequences in one request (prompts × n): SGLang 0.5.23 accepts
  n = 100000 and then stops answering every later request.
The limits are read from the environment on every request.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from typing import Any

DEFAULT_MAX_N = 64
DEFAULT_MAX_SEQUENCES = 1024
_TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"

_registered = False


def _env_limit(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        limit = int(value) if value else default
    except ValueError as err:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from err
    if limit < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return limit


def _fmbc_vocab_size(tokenizer_manager: Any) -> int | None:
    """V when the served model is an FMBC checkpoint, else None (other models are left alone)."""
    config = tokenizer_manager.model_config.hf_config
    return config.vocab_size if getattr(config, "model_type", None) == "fmbc" else None


def check_token_ids(input_ids: Any, vocab_size: int) -> None:
    """Raise ValueError naming the first id outside [0, vocab_size)."""
    for token_id in input_ids or ():
        if not 0 <= int(token_id) < vocab_size:
            raise ValueError(f"token id {int(token_id)} is out of vocabulary: FMBC token ids must lie in "
                             f"[0, {vocab_size})")


def check_sample_counts(sampling_params: Any, num_prompts: int) -> None:
    """Raise ValueError if n is below 1 or above FMBC_MAX_N, or prompts × n is above FMBC_MAX_SEQUENCES."""
    max_n = _env_limit("FMBC_MAX_N", DEFAULT_MAX_N)
    max_sequences = _env_limit("FMBC_MAX_SEQUENCES", DEFAULT_MAX_SEQUENCES)
    params = sampling_params if isinstance(sampling_params, list) else [sampling_params or {}]
    total = 0
    for p in params:
        n = p.get("n", 1) if isinstance(p, dict) else 1
        n = 1 if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        if n > max_n:
            raise ValueError(f"n must be at most {max_n} for this server (FMBC_MAX_N), got {n}")
        total = max(total, n)
    if total * num_prompts > max_sequences:
        raise ValueError(f"this request asks for {total * num_prompts} sequences ({num_prompts} prompts × n={total}); "
                         f"the limit is {max_sequences} (FMBC_MAX_SEQUENCES)")


def _num_prompts(obj: Any) -> int:
    """How many prompts a not-yet-normalised GenerateReqInput carries."""
    if isinstance(obj.text, list):
        return len(obj.text)
    if isinstance(obj.input_ids, list) and obj.input_ids and isinstance(obj.input_ids[0], list):
        return len(obj.input_ids)
    return 1


def _before_validate_one_request(tokenizer_manager: Any, obj: Any, input_ids: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE hook on TokenizerManager._validate_one_request: every prompt, single or batched, text or ids,
    passes here with its final token ids, and a ValueError here becomes HTTP 400."""
    vocab_size = _fmbc_vocab_size(tokenizer_manager)
    if vocab_size is not None:
        check_token_ids(input_ids, vocab_size)


def _around_generate_request(original: Callable, tokenizer_manager: Any, obj: Any, *args: Any,
                             **kwargs: Any) -> AsyncIterator[Any]:
    """AROUND hook on TokenizerManager.generate_request (an async generator): checks the sample counts before
    SGLang expands n into n copies of the request. Raising on the first step keeps generate_request's
    contract, so the HTTP layers turn the ValueError into a 400 (streaming too: they pull the first chunk
    before sending headers)."""

    async def checked() -> AsyncIterator[Any]:
        if _fmbc_vocab_size(tokenizer_manager) is not None and hasattr(obj, "sampling_params"):
            check_sample_counts(obj.sampling_params, _num_prompts(obj))
        async for item in original(tokenizer_manager, obj, *args, **kwargs):
            yield item

    return checked()


def register() -> None:
    """The `sglang.srt.plugins` entry point. Idempotent: SGLang may call it more than once per process."""
    global _registered
    if _registered:
        return
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    # Importing our package also registers FMBCConfig with transformers' AutoConfig, which SGLang needs to
    # parse config.json (model_type "fmbc") in every process.
    from fmbc_serve.engines.sglang.models.fmbc import FMBCForCausalLM

    ModelRegistry.models[FMBCForCausalLM.__name__] = FMBCForCausalLM
    HookRegistry.register(f"{_TOKENIZER_MANAGER}._validate_one_request", _before_validate_one_request,
                          HookType.BEFORE)
    HookRegistry.register(f"{_TOKENIZER_MANAGER}.generate_request", _around_generate_request, HookType.AROUND)
    _registered = True
