#!/usr/bin/env bash
# Serve the embedded default FMBC model (or a checkpoint folder given as the first argument) with vLLM's
# OpenAI-compatible server on port 30000, from a fresh clone: builds the vLLM environment on first use
# (scripts/venv.sh vllm, a few minutes), then runs `fmbc serve`. Extra arguments go to `fmbc serve`
# (e.g. --port 8000, or engine flags such as --max-model-len 128).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$here/scripts/venv.sh" vllm)
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec "$venv/bin/fmbc" serve "$@"
