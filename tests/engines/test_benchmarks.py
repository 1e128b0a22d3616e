"""The serving benchmark script still runs: a small paired vLLM run (FMBC and a second server of it, the noise
floor) through the engine's own benchmark client, with the ratios printed and the figures and plot written (the
real runs and their figures are in docs/benchmarks.md)."""

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
               "--shape", "tiny", "--models", "fmbc", "fmbc-again", "--concurrency", "2", "--rounds", "2",
               "--input-len", "8", "--output-len", "8", "--min-prompts", "2", "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "fmbc/fmbc-again  c=2" in result.stdout
    vllm = json.loads(out.with_suffix(".json").read_text())["engines"]["vllm"]
    assert vllm["order"]["2"] == [["fmbc", "fmbc-again"], ["fmbc-again", "fmbc"]]
    for model in ("fmbc", "fmbc-again"):
        server = vllm["servers"][model]
        assert "error" not in server and server["load_s"] > 0
        assert server["peak_rss_gib"] >= server["idle_pss_gib"] > 0.1
        assert [r["round"] for r in vllm["measurements"][model]["2"]] == [0, 1]
        assert vllm["summary"][model]["2"]["throughput"]["min"] > 0
    noise = vllm["ratios"]["fmbc/fmbc-again"]["2"]
    fmbc, again = (vllm["measurements"][m]["2"] for m in ("fmbc", "fmbc-again"))
    assert noise["values"] == [a["output_throughput"] / b["output_throughput"]
                               for a, b in zip(fmbc, again, strict=True)]
    assert noise["min"] <= noise["median"] <= noise["max"] and noise["n"] == 2
    assert out.with_suffix(".png").stat().st_size > 10_000
