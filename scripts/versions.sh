# The one place that states the engine versions CI tests; the Dockerfiles' ARG defaults are checked against it.
VLLM_VERSION=0.32.0
SGLANG_VERSION=0.5.23
CORE_TORCH_VERSION=2.13.0
