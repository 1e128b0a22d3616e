"""SGLang model classes for FMBC checkpoints.

This package is what `SGLANG_EXTERNAL_MODEL_PACKAGE=fmbc_serve.engines.sglang.models` points at: SGLang imports
each direct submodule and registers its module-level `EntryClass` under the class name, which must equal
`architectures[0]` in config.json (`FMBCForCausalLM`). The `sglang.srt.plugins` entry point
(`fmbc_serve.engines.sglang.plugin:register`) registers the same class without the environment variable.
"""
