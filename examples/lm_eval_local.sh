#!/usr/bin/env bash
# lm-eval's `local-completions` against an FMBC server, on a small local task (examples/lm_eval_task).
# Log-likelihoods come from /v1/completions with echo + logprobs. lm-eval needs the tokenizer to find where the
# continuation starts: it reads it from the checkpoint folder (nothing is downloaded). Needs
# `pip install "lm-eval[api]"`.
#   BASE_URL (default http://localhost:30000), MODEL (default fmbc),
#   CHECKPOINT (the served folder, for its tokenizer; default: the embedded model), OPENAI_API_KEY (only for a
#   server started with an API key: lm-eval sends it)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BASE_URL=${BASE_URL:-http://localhost:30000}
MODEL=${MODEL:-fmbc}
CHECKPOINT=${CHECKPOINT:-$(python -c "from fmbc_serve.serve import DEFAULT_MODEL; print(DEFAULT_MODEL)")}
cd "$here/lm_eval_task"   # the task's data_files path is relative to the working directory
lm_eval --model local-completions \
  --model_args "model=$MODEL,base_url=$BASE_URL/v1/completions,tokenizer_backend=huggingface,tokenizer=$CHECKPOINT,trust_remote_code=True,tokenized_requests=False,num_concurrent=1,max_retries=1" \
  --include_path "$here/lm_eval_task" --tasks kjv_cloze --batch_size 1 "$@"
