"""The serving benchmark script still runs: a small vLLM run through the engine's own benchmark client, with
ratios printed and the figures and plot written (the real run and its figures are in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.engines import require

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]


def test_serving_benchmark_script_runs(tmp_path: Path) -> None:
    require("vllm")
    out = tmp_path / "bench"
    command = [sys.executable, "scripts/serving_benchmark.py", "--engines", "vllm", "--vllm-python", sys.executable,
               "--concurrency", "1", "2", "--rounds", "1", "--input-len", "8", "--output-len", "8",
               "--min-prompts", "2", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "FMBC/learned throughput: c=1" in result.stdout and "FMBC/stock throughput: c=1" in result.stdout
    figures = json.loads(out.with_suffix(".json").read_text())
    assert set(figures["summary"]["vllm"]) == {"fmbc", "learned", "stock"}
    assert figures["summary"]["vllm"]["fmbc"]["1"]["output_throughput"] > 0
    assert out.with_suffix(".png").stat().st_size > 10_000
