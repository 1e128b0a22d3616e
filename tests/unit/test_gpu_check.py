"""scripts/gpu_check.py, the one-GPU acceptance run, in its CPU dry run: everything but the CUDA parts, with the
same JSON report. (On a GPU machine: `python scripts/gpu_check.py`, docs/kernel.md.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("environment", "kernel_tests", "compile", "bandwidth", "model")


def test_dry_run_checks_everything_but_the_gpu(tmp_path: Path) -> None:
    out = tmp_path / "dry.json"
    result = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(out)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["schema"] == "fmbc-gpu-check/1" and report["mode"] == "dry-run" and report["passed"] is True
    assert {name: report[name]["status"] for name in SECTIONS} == {
        "environment": "passed", "kernel_tests": "passed", "compile": "passed", "bandwidth": "skipped",
        "model": "passed"}
    assert report["environment"]["fmbc_kernels"] == str((REPO_ROOT / "kernels").resolve())

    tests = report["kernel_tests"]
    assert tests["tests"] >= 16 and tests["failures"] == tests["errors"] == tests["skipped"] == 0
    assert "tests/unit/test_kernel.py" in tests["command"]

    compiled = report["compile"]
    assert compiled["arch"] == 90 and compiled["jit"].startswith("skipped")
    variants = {(k["variant"]["affine"], k["variant"]["layer_norm"]) for k in compiled["kernels"]}
    assert variants == {(False, True), (False, False), (True, True), (True, False)}
    for kernel in compiled["kernels"]:
        assert kernel["variant"]["width"] == 1024 and kernel["variant"]["dtype"] == "bfloat16"
        assert kernel["aot"]["local_bytes"] == 0 and kernel["aot"]["store_bits"] == [128]
        assert len(kernel["aot"]["kernel_hash"]) == 64

    model = report["model"]
    assert model["config"] == {"vocab_size": 65536, "hidden_size": 1024, "num_hidden_layers": 2,
                               "num_attention_heads": 32, "intermediate_size": 4096, "dtype": "bfloat16",
                               "batch": 1, "length": 16}
    assert model["kernel_calls_eager"] >= 1 and model["kernel_calls_compiled"] >= 1
    errors = model["mean_abs_error_vs_fp32"]
    assert 0 < errors["fused_bf16"] <= 1.1 * errors["unfused_bf16"]
    assert 0 < errors["compiled_bf16"] <= 1.1 * errors["unfused_bf16"]
    assert model["forward_ms"].startswith("skipped")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the command runs the real check")
def test_without_a_gpu_the_check_asks_for_the_dry_run(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path / "x.json")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "--dry-run" in result.stderr
    assert not (tmp_path / "x.json").exists()
