#!/usr/bin/env bash
# The model card's curl against a running server (`fmbc serve`, or the engines' own commands / Docker images).
#   BASE_URL (default http://localhost:30000), MODEL (default fmbc: the name `fmbc serve` serves under)
set -euo pipefail
BASE_URL=${BASE_URL:-http://localhost:30000}
MODEL=${MODEL:-fmbc}
curl -sS -f "$BASE_URL/v1/completions" \
  -H "Content-Type: application/json" \
  -d "{\"model\": \"$MODEL\", \"prompt\": \"And God said,\", \"max_tokens\": 32, \"temperature\": 0}"
echo
