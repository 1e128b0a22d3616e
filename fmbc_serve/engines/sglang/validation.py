"""Request validation for FMBC checkpoints on SGLang (config.json `model_type` "fmbc"; other models are left
alone): hooks that `plugin.register` installs with SGLang's HookRegistry, in the process that runs the
TokenizerManager.

SGLang itself accepts any token id, any n (a huge one stops it answering later requests) and any model name
(docs/sglang.md, "Request validation"), but a fixed binary code would silently encode a token that does not
exist, and a learned table would index out of bounds. So:
- a prompt with a token id outside [0, vocab_size) gets HTTP 400;
- n below 1 or above `FMBC_MAX_N`, or more than `FMBC_MAX_SEQUENCES` sequences in one request (prompts × n),
  gets HTTP 400; both limits are read from the environment on every request;
- an OpenAI request naming a model this server does not serve gets HTTP 404 with vLLM's error body. Omitting
  `model` still picks the served model, and `served-name:adapter` (SGLang's LoRA syntax) is left to SGLang.
Every rejection is logged once, as a WARNING line starting "fmbc-serve rejected request", with the reason.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fmbc_serve.binary_code import check_token_ids

DEFAULT_MAX_N = 64
DEFAULT_MAX_SEQUENCES = 1024

logger = logging.getLogger(__name__)


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


def log_rejection(request_id: Any, reason: str) -> None:
    """The one log line of a request our hooks reject (the HTTP answer carries the same reason)."""
    logger.warning("fmbc-serve rejected request %s: %s", request_id or "-", reason)


def before_validate_one_request(tokenizer_manager: Any, obj: Any, input_ids: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE hook on TokenizerManager._validate_one_request: every prompt, single or batched, text or ids,
    passes here with its final token ids, and a ValueError here becomes HTTP 400."""
    vocab_size = _fmbc_vocab_size(tokenizer_manager)
    if vocab_size is None:
        return
    try:
        check_token_ids(input_ids, vocab_size)
    except ValueError as err:
        log_rejection(getattr(obj, "rid", None), str(err))
        raise


def around_generate_request(original: Callable, tokenizer_manager: Any, obj: Any, *args: Any,
                            **kwargs: Any) -> AsyncIterator[Any]:
    """AROUND hook on TokenizerManager.generate_request (an async generator): checks the sample counts before
    SGLang expands n into n copies of the request. Raising on the first step keeps generate_request's
    contract, so the HTTP layers turn the ValueError into a 400 (streaming too: they pull the first chunk
    before sending headers)."""

    async def checked() -> AsyncIterator[Any]:
        if _fmbc_vocab_size(tokenizer_manager) is not None and hasattr(obj, "sampling_params"):
            try:
                check_sample_counts(obj.sampling_params, _num_prompts(obj))
            except ValueError as err:
                log_rejection(getattr(obj, "rid", None), str(err))
                raise
        async for item in original(tokenizer_manager, obj, *args, **kwargs):
            yield item

    return checked()


def unknown_model_error(requested: str, served: str) -> dict[str, Any]:
    """vLLM's 404 body for a model it does not serve (`ErrorResponse` of vllm.entrypoints), naming the served
    model too."""
    return {"error": {"message": f"The model `{requested}` does not exist. This server serves `{served}`.",
                      "type": "NotFoundError", "param": "model", "code": 404}}


def around_handle_request(original: Callable, serving: Any, request: Any, *args: Any,
                          **kwargs: Any) -> Awaitable[Any]:
    """AROUND hook on OpenAIServingBase.handle_request, the entry of every OpenAI endpoint (streaming too):
    answers 404 before any work when the request names a model that is not served (behind a router that routes
    by model name, serving it anyway would serve the wrong model)."""
    from fastapi.responses import ORJSONResponse

    tokenizer_manager = serving.tokenizer_manager
    requested = getattr(request, "model", None)
    named = "model" in getattr(request, "model_fields_set", ())
    if named and requested and _fmbc_vocab_size(tokenizer_manager) is not None:
        served = tokenizer_manager.served_model_name
        base, _adapter = serving._parse_model_parameter(requested)
        if base != served:
            body = unknown_model_error(requested, served)
            log_rejection(getattr(request, "rid", None), body["error"]["message"])

            async def not_found() -> Any:
                return ORJSONResponse(content=body, status_code=404)

            return not_found()
    return original(serving, request, *args, **kwargs)
