"""Time and memory of `fmbc import` at the published shape, on a foreign checkpoint written with its own code.

    python scripts/import_benchmark.py [--workdir DIR] [--layers 32] [--keep]

Writes a Pythia-style FMBC checkpoint (its own modeling code, parallel residual, the code computed in forward)
at the paper's shape (the `paper` preset of fmbc_serve/checkpoint.py; --layers of them) in float32, then runs
`fmbc import SRC --out DIR --trust-remote-code` as a user does and prints wall time, peak memory (the import's
resident set) and its ratio to the checkpoint's size, and the proof's figures, as one JSON line. Not in CI: the
checkpoint alone is gigabytes. Figures: docs/import.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fmbc_serve.checkpoint import PRESETS
from fmbc_serve.devtools.foreign import write_foreign

PAPER = PRESETS["paper"]
# The paper's shape in the Pythia style's own config fields (its context is `max_sequence_window`).
PUBLISHED_SHAPE = dict(vocab_size=PAPER["vocab_size"], hidden_size=PAPER["hidden_size"],
                       num_attention_heads=PAPER["num_attention_heads"], intermediate_size=PAPER["intermediate_size"],
                       max_sequence_window=PAPER["max_position_embeddings"], initializer_range=0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to write (default: a temporary folder)")
    parser.add_argument("--layers", type=int, default=PAPER["num_hidden_layers"])
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fmbc-import-bench-"))
    source, out = workdir / "published", workdir / "imported"
    shutil.rmtree(out, ignore_errors=True)
    if not source.exists():
        start = time.monotonic()
        write_foreign("pythia", source, num_hidden_layers=args.layers, **PUBLISHED_SHAPE)
        print(f"wrote the foreign checkpoint in {time.monotonic() - start:.0f} s", file=sys.stderr)
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    fmbc = str(Path(sys.executable).parent / "fmbc")
    start = time.monotonic()
    run = subprocess.run([fmbc, "import", str(source), "--out", str(out), "--trust-remote-code"], text=True,
                         capture_output=True)
    wall = time.monotonic() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # bytes (Linux reports KiB)
    if run.returncode != 0:
        sys.exit(f"fmbc import failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    proof = json.loads((out / "import_report.json").read_text())["proof"]
    print(json.dumps({"layers": args.layers, "checkpoint_bytes": size, "import_seconds": round(wall, 1),
                      "peak_rss_bytes": peak, "peak_over_checkpoint": round(peak / size, 2), "proof": proof}))
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
