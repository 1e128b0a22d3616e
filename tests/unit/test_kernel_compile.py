"""The fused kernel compiled ahead of time for sm_80, sm_90 and sm_100 on a machine without a GPU.

Triton compiles for any CUDA target with its bundled ptxas, and its bundled cuobjdump reads the result:
`fmbc_kernels.compile_report` compiles through the JIT's own path with the launcher's own arguments and tile, so
each kernel checked here is the one a launch on that GPU would compile. For the widths that matter (the paper's
1,024, the embedded default model's, 1,000 and the odd 1,001), each output dtype and each input variant: it
compiles, nothing spills, the global stores are as wide as the row allows, and registers stay within budget.

One subprocess compiles everything, without TRITON_INTERPRET (conftest.py sets it on machines without CUDA, and
the interpreter replaces @triton.jit functions with Python ones); docs/kernel.md says how long it takes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from fmbc_kernels.code_norm_triton import launch_config  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WIDTH = json.loads((REPO_ROOT / "fmbc_serve" / "default_model" / "config.json").read_text())["hidden_size"]
ARCHES = (80, 90, 100)
WIDTHS = (1024, DEFAULT_WIDTH, 1000, 1001)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Per thread. 65,536 registers per SM on all three targets: at <= 40, programs of >= 2 warps keep >= 48 of the 64
# warps an SM holds resident (75% occupancy), plenty for a kernel that only streams stores.
REGISTER_BUDGET = 40
MIN_WARPS_PER_SM = 48
NEIGHBOUR_ARCH = 90  # the tile and warps are chosen against their neighbours on Hopper (H100/H200)


def expected_store_bits(width: int, dtype: torch.dtype) -> int:
    """A 16-byte store needs 16-byte aligned addresses, and row t starts at byte t·d·itemsize. d = 1024, 256 and
    1000 (= 8·125: not a multiple of 16, which Triton's integer specialisation would need, so the kernel takes d
    as a constexpr) give rows of a multiple of 16 bytes in every dtype: 128-bit stores. d = 1001 is odd: rows
    after the first are only element-aligned, so every store is one element."""
    assert width % 8 == 0 or width % 2 == 1, "this test's widths are multiples of 8 or odd"
    return 128 if width * dtype.itemsize % 16 == 0 else 8 * dtype.itemsize


LAUNCH_CASES = [
    pytest.param(arch, width, dtype, affine, layer_norm,
                 id=f"sm_{arch}-d{width}-{dtype}-{'affine' if affine else 'binary'}-"
                    f"{'layernorm' if layer_norm else 'rmsnorm'}")
    for arch, width, dtype, affine, layer_norm in product(ARCHES, WIDTHS, DTYPES, (False, True), (True, False))
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple, dict]:
    """Every launch variant, and the neighbours of the affine LayerNorm ones on sm_90, keyed by variant."""
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "fmbc_kernels.compile_report", "--json", str(out),
               "--arch", *map(str, ARCHES), "--width", *map(str, WIDTHS), "--dtype", *DTYPES,
               "--neighbours", str(NEIGHBOUR_ARCH)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {tuple(r["variant"].values()): r for r in json.loads(out.read_text())}


@pytest.mark.parametrize(("arch", "width", "dtype", "affine", "layer_norm"), LAUNCH_CASES)
def test_launch_config_compiles_without_spills_with_widest_stores(compiled, arch: int, width: int, dtype: str,
                                                                  affine: bool, layer_norm: bool) -> None:
    config = launch_config(width, DTYPES[dtype])
    record = compiled[(arch, width, dtype, affine, layer_norm, config.block_t, config.num_warps)]
    assert record["local_bytes"] == 0 and record["local_accesses"] == 0, f"spills: {record}"
    assert record["store_bits"] == [expected_store_bits(width, DTYPES[dtype])], record
    assert record["registers"] <= REGISTER_BUDGET, record
    assert record["warps_per_sm"] >= MIN_WARPS_PER_SM, record


@pytest.mark.parametrize(("width", "dtype"), [pytest.param(width, dtype, id=f"d{width}-{dtype}")
                                              for width, dtype in product(WIDTHS, DTYPES)])
def test_no_neighbouring_tile_beats_the_launch_config(compiled, width: int, dtype: str) -> None:
    """Half or twice the warps or rows per program: none has wider stores at no lower occupancy, or more
    resident warps at no narrower stores. (The full sweep: `python -m fmbc_kernels.compile_report --sweep`.)"""
    config = launch_config(width, DTYPES[dtype])
    chosen = compiled[(NEIGHBOUR_ARCH, width, dtype, True, True, config.block_t, config.num_warps)]
    neighbours = [r for key, r in compiled.items()
                  if key[:5] == (NEIGHBOUR_ARCH, width, dtype, True, True) and r is not chosen]
    assert len(neighbours) >= 2
    for other in neighbours:
        if other["local_bytes"]:
            continue
        wider = max(other["store_bits"]) > max(chosen["store_bits"])
        as_wide = max(other["store_bits"]) >= max(chosen["store_bits"])
        assert not (wider and other["warps_per_sm"] >= chosen["warps_per_sm"]), (chosen, other)
        assert not (as_wide and other["warps_per_sm"] > chosen["warps_per_sm"]), (chosen, other)


def test_report_refuses_the_interpreter() -> None:
    result = subprocess.run([sys.executable, "-m", "fmbc_kernels.compile_report", "--arch", "90"],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "TRITON_INTERPRET=1 is set" in result.stderr
