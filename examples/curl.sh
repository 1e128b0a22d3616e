#!/usr/bin/env bash
# The model card's curl against a running server (`fmbc serve`, or the engines' own commands / Docker images).
#   BASE_URL (default http://localhost:30000), MODEL (default fmbc: the name `fmbc serve` serves under),
#   OPENAI_API_KEY (only for a server started with an API key, as the OpenAI SDKs read it)
set -euo pipefail
BASE_URL=${BASE_URL:-http://localhost:30000}
MODEL=${MODEL:-fmbc}
auth=()
[ -n "${OPENAI_API_KEY:-}" ] && auth=(-H "Authorization: Bearer $OPENAI_API_KEY")
curl -sS -f "$BASE_URL/v1/completions" "${auth[@]}" \
  -H "Content-Type: application/json" \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"And God said,\", \"max_tokens\": 32, \"temperature\": 0}"
echo
