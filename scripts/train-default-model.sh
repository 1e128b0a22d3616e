#!/usr/bin/env bash
# Reproduce the embedded default model (docs/default-model.md): fetch the KJV text, train the FMBC model and
# its learned-table twin with the same data, seed and number of steps (one CPU thread each, side by side),
# then copy the FMBC checkpoint into fmbc_serve/default_model. Takes ~35 minutes on a 2-core machine (~30 minutes
# each run alone).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
venv=$(bash scripts/venv.sh core)
[ -f data/kjv.txt ] || bash scripts/fetch-kjv.sh
# The paper's context (1,024 tokens): 600 steps × 4 windows × 1,024 tokens, the same 2.46 M tokens as before.
common=(--data data/kjv.txt --vocab-size 4096 --hidden-size 256 --layers 4 --heads 8 --context 1024
        --batch-size 4 --steps 600 --eval-every 100 --lr 2e-3 --warmup 60 --seed 0 --threads 1)
"$venv/bin/fmbc" train "${common[@]}" --input-mode binary --out runs/kjv1024-binary > runs/kjv1024-binary.log 2>&1 &
"$venv/bin/fmbc" train "${common[@]}" --input-mode learned --out runs/kjv1024-learned > runs/kjv1024-learned.log 2>&1 &
wait
"$venv/bin/python" - <<'PY'
import shutil
from pathlib import Path
source, target = Path("runs/kjv1024-binary"), Path("fmbc_serve/default_model")
target.mkdir(exist_ok=True)
for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
             "generation_config.json", "config.json"):
    shutil.copyfile(source / name, target / name)
# The remote-code files stay symbolic links to the package's own sources (one copy of the code in the repository;
# the wheel and the Docker images carry their contents), so transformers alone loads the folder like any other.
for name in ("binary_code.py", "configuration_fmbc.py", "modeling_fmbc.py"):
    link = target / name
    link.unlink(missing_ok=True)
    link.symlink_to(Path("..") / name)
PY
tail -n 1 runs/kjv1024-binary/train_log.jsonl runs/kjv1024-learned/train_log.jsonl
