"""vLLM plugin: registers FMBC with vLLM's model registry and transformers' AutoConfig.

Loaded by vLLM in every process (API server, engine core, workers) through the `vllm.general_plugins` entry
point, possibly more than once, so `register` is idempotent. The model class is registered lazily by name, so
importing the plugin does not import vLLM's model code (or initialise CUDA) in processes that never use it.
"""

from __future__ import annotations

ARCHITECTURE = "FMBCForCausalLM"


def register() -> None:
    """Make `FMBCForCausalLM` checkpoints servable by stock vLLM commands."""
    import vllm
    from vllm import ModelRegistry

    from fmbc_serve.versions import warn_if_untested

    warn_if_untested("vllm", vllm.__version__)

    import fmbc_serve  # noqa: F401  (registers FMBCConfig with AutoConfig: config.json has model_type "fmbc")

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "fmbc_serve.engines.vllm.model:FMBCForCausalLM")
