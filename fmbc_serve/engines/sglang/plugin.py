"""SGLang plugin: registers the FMBC model class and the request validation hooks (`validation`).

SGLang calls `register()` through the `sglang.srt.plugins` entry point in its launcher, scheduler and
detokenizer processes, so `python -m sglang.launch_server --model-path DIR` serves an FMBC checkpoint with no
environment variable (the alternative, `SGLANG_EXTERNAL_MODEL_PACKAGE=fmbc_serve.engines.sglang.models`, also
works, without the validation).
"""

from __future__ import annotations

from fmbc_serve.engines.sglang.validation import (
    around_generate_request,
    around_handle_request,
    before_validate_one_request,
)

_TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
_OPENAI_SERVING = "sglang.srt.entrypoints.openai.serving_base.OpenAIServingBase"

# (SGLang function or method, our hook, HookType name); scripts/check_engine_releases.py checks that every
# target still exists in the newest SGLang release.
HOOKS = (
    (f"{_TOKENIZER_MANAGER}._validate_one_request", before_validate_one_request, "BEFORE"),
    (f"{_TOKENIZER_MANAGER}.generate_request", around_generate_request, "AROUND"),
    (f"{_OPENAI_SERVING}.handle_request", around_handle_request, "AROUND"),
)

_registered = False


def register() -> None:
    """The `sglang.srt.plugins` entry point. Idempotent: SGLang may call it more than once per process."""
    global _registered
    if _registered:
        return
    from sglang.srt.models.registry import ModelRegistry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.version import __version__

    from fmbc_serve.versions import warn_if_untested

    warn_if_untested("sglang", __version__)

    # Importing our package also registers FMBCConfig with transformers' AutoConfig, which SGLang needs to
    # parse config.json (model_type "fmbc") in every process.
    from fmbc_serve.engines.sglang.models.fmbc import FMBCForCausalLM

    ModelRegistry.models[FMBCForCausalLM.__name__] = FMBCForCausalLM
    for target, hook, hook_type in HOOKS:
        HookRegistry.register(target, hook, HookType[hook_type])
    _registered = True
