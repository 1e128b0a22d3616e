"""Time and memory of `fmbc import` at the published shape, on a foreign checkpoint written with its own code.

    python scripts/import_benchmark.py [--workdir DIR] [--layers 32] [--keep]

Writes a Pythia-style FMBC checkpoint (its own modeling code, parallel residual, the code computed in forward)
at V = 65,536, d = 1,024, 32 heads, MLP 4,096, context 1,024, float32 (1.9 GB), then runs
`fmbc import SRC --out DIR --trust-remote-code` as a user does and prints wall time, peak memory (the import's
resident set) and its ratio to the checkpoint's size, and the proof's figures, as one JSON line. Not in CI:
writing the checkpoint alone takes a minute or two. Figures: docs/import.md.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.foreign import write_foreign  # noqa: E402

PUBLISHED_SHAPE = dict(vocab_size=65536, hidden_size=1024, num_attention_heads=32, intermediate_size=4096,
                       max_sequence_window=1024, initializer_range=0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="where to write (default: a temporary folder)")
    parser.add_argument("--layers", type=int, default=32)
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
