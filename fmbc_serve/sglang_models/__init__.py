"""The earlier, documented value `SGLANG_EXTERNAL_MODEL_PACKAGE=fmbc_serve.sglang_models`, kept working: its one
submodule re-exports the model class that lives in `fmbc_serve.engines.sglang.models`."""
