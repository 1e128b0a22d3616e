"""The fused code + norm kernel against its pure-torch reference: on the GPU when CUDA is present, under the
Triton interpreter on CPU otherwise (conftest.py sets TRITON_INTERPRET=1 before triton is imported when there
is no CUDA). The interpreter is slow per program (docs/kernel.md), so the grid is sampled: every (K, d, layout)
combination the code allows, with the other options cycled across them, and a full cross of norm x dtype x
statistics variant on one code. On CUDA, CUDA-graph capture is checked too. scripts/kernel_benchmark.py times
the kernel on the same inputs (`fmbc_serve.devtools.kernel_inputs`).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from fmbc_kernels import (  # noqa: E402
    code_norm,
    code_norm_triton,
    fused_code_norm,
    fused_kernel_enabled,
    reference_code_norm,
)
from support.checkpoints import scrambled_lift_map  # noqa: E402

from fmbc_serve.binary_code import BinaryCode, FixedCodeInput, random_affine  # noqa: E402
from fmbc_serve.devtools.kernel_inputs import DEVICE, EPS, boundary_ids, norm_params  # noqa: E402
from fmbc_serve.modeling_fmbc import embed_input  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # rtol = atol: ~2 ulp
NUM_BITS = (1, 9, 16, 24)
WIDTHS = (64, 1000, 1024)
LAYOUTS = ("repeat", "interleave", "map")


def make_code(num_bits: int, width: int, layout: str, affine: bool = False, vocab_size: int | None = None,
              **options) -> BinaryCode:
    rows, bias = random_affine(num_bits, seed=num_bits * 7 + width) if affine else (None, 0)
    if layout == "map":
        options["lift_map"] = scrambled_lift_map(num_bits, width)
    return BinaryCode(vocab_size or 2**num_bits, width, layout=layout,
                      affine_rows=None if rows is None else tuple(rows), affine_bias=bias, **options)


def interleave_truncates(num_bits: int, width: int) -> bool:
    """Whether repeating each of K bits ceil(d/K) times pushes the last bit past d (BinaryCode rejects it)."""
    return (num_bits - 1) * -(-width // num_bits) >= width


def assert_matches_reference(ids, code, weight, bias, dtype, closed_form: bool) -> None:
    residual, normed = fused_code_norm(ids, code, weight, bias, EPS, dtype, closed_form=closed_form)
    expected_residual, expected_normed = reference_code_norm(ids, code, weight, bias, EPS, dtype)
    assert residual.dtype == normed.dtype == dtype
    assert torch.equal(residual, expected_residual)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(normed, expected_normed, rtol=tolerance, atol=tolerance)


# Every (K, d, layout) the code allows. The other options cycle across these cases, each with its own period so
# that every value occurs and the options vary independently of one another.
CYCLED_OPTIONS = {
    "affine": (False, True),
    "bit_order": ("lsb", "lsb", "msb", "msb"),
    "values": ("zero_one",) * 4 + ("sign",) * 4,
    "scale": (1.0,) * 3 + (-0.37,) * 3,
    "dtype": DTYPES,
    "num_tokens": ((1, 1),) * 5 + ((37, 64),) * 5 + ((300, 200),) * 5,  # (for d = 64, for wider rows)
}


def grid_case(index: int, num_bits: int, width: int, layout: str):
    options = {name: values[index % len(values)] for name, values in CYCLED_OPTIONS.items()}
    num_tokens = options["num_tokens"][0 if width <= 64 else 1]
    dtype_name = str(options["dtype"]).removeprefix("torch.")
    case_id = (f"K{num_bits}-d{width}-{layout}-{'affine' if options['affine'] else 'plain'}-{options['values']}-"
               f"{options['bit_order']}-scale{options['scale']:g}-{dtype_name}-T{num_tokens}")
    return pytest.param(num_bits, width, layout, options["affine"], options["bit_order"], options["values"],
                        options["scale"], options["dtype"], num_tokens, id=case_id)


GRID = [grid_case(index, *combo) for index, combo in enumerate(
    (k, d, layout) for k, d, layout in itertools.product(NUM_BITS, WIDTHS, LAYOUTS)
    if not (layout == "interleave" and interleave_truncates(k, d)))]


@pytest.mark.parametrize(("num_bits", "width", "layout", "affine", "bit_order", "values", "scale", "dtype",
                          "num_tokens"), GRID)
def test_kernel_matches_reference_over_code_grid(num_bits: int, width: int, layout: str, affine: bool, bit_order: str,
                                                 values: str, scale: float, dtype: torch.dtype,
                                                 num_tokens: int) -> None:
    code = make_code(num_bits, width, layout, affine=affine, bit_order=bit_order, values=values, scale=scale)
    seed = num_bits * 10_000 + width
    ids = boundary_ids(code, num_tokens, seed=seed)
    for layer_norm, closed_form in itertools.product((True, False), (True, False)):
        weight, bias = norm_params(width, dtype, layer_norm, seed=seed)
        assert_matches_reference(ids, code, weight, bias, dtype, closed_form)


@pytest.mark.parametrize("num_bits", NUM_BITS)
def test_interleave_that_truncates_a_bit_is_rejected(num_bits: int) -> None:
    for width in WIDTHS:
        if interleave_truncates(num_bits, width):
            with pytest.raises(ValueError, match="truncates away the last bit"):
                make_code(num_bits, width, "interleave")


@pytest.mark.parametrize(("dtype", "layer_norm", "closed_form"), [
    pytest.param(dtype, layer_norm, closed_form, id=f"{str(dtype).removeprefix('torch.')}-"
                 f"{'layernorm' if layer_norm else 'rmsnorm'}-{'closed' if closed_form else 'reduction'}")
    for dtype, layer_norm, closed_form in itertools.product(DTYPES, (True, False), (True, False))])
def test_norm_dtype_and_variant_cross(dtype: torch.dtype, layer_norm: bool, closed_form: bool) -> None:
    code = make_code(16, 1000, "interleave", affine=True, values="sign", scale=0.5)
    ids = boundary_ids(code, 100, seed=1)
    weight, bias = norm_params(1000, dtype, layer_norm, seed=2)
    assert_matches_reference(ids, code, weight, bias, dtype, closed_form)


# One bf16 ulp relative to the value (8 significant bits: neighbours differ by 2^-7 of the smaller power of two).
BF16_ULP = 2.0**-7


@pytest.mark.parametrize("layer_norm", [True, False], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("affine", [False, True], ids=["paper-code", "affine-sign-code"])
def test_bf16_kernel_against_the_unfused_torch_path(layer_norm: bool, affine: bool) -> None:
    """The switch a served model makes: `input_stage` fused (this kernel, on CUDA) or unfused (the code's lift
    in bf16, then the model's own bf16 `nn.LayerNorm`/`nn.RMSNorm`), at the paper's shape (V = 65,536, d = 1,024).

    The residuals are the same bf16 values, bit for bit (both round the code's two values to bf16 first). The
    normed outputs are each computed in fp32 from those and rounded once to bf16; the two fp32 values differ only
    by fp32 rounding (~1e-6 relative: closed-form vs reduced statistics), so the bf16 results are equal or one
    ulp apart (rtol 2^-7), with atol 1e-5 for outputs where the bias cancels the rest to near zero. On CUDA, where
    Triton rounds fp32 to bf16 to nearest as torch does, at least 99% are bit-identical. The Triton interpreter
    truncates fp32 to bf16 instead (its cast ignores the rounding mode), so on CPU about half differ by that ulp."""
    code = make_code(16, 1024, "interleave", affine=affine, values="sign" if affine else "zero_one")
    generator = torch.Generator().manual_seed(12)
    norm = torch.nn.LayerNorm(1024) if layer_norm else torch.nn.RMSNorm(1024)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(1024, generator=generator))
        if layer_norm:
            norm.bias.copy_(0.5 * torch.randn(1024, generator=generator))
    norm = norm.to(DEVICE, torch.bfloat16)
    code_input = FixedCodeInput(code).to(DEVICE)
    ids = boundary_ids(code, 256, seed=12)
    with torch.no_grad():
        unfused_residual = embed_input(code_input, ids, torch.bfloat16)
        unfused_normed = norm(unfused_residual)
    residual, normed = fused_code_norm(ids, code, norm.weight, getattr(norm, "bias", None), EPS, torch.bfloat16)
    assert residual.dtype == normed.dtype == unfused_normed.dtype == torch.bfloat16
    assert torch.equal(residual, unfused_residual)
    torch.testing.assert_close(normed, unfused_normed, rtol=BF16_ULP, atol=1e-5)
    if DEVICE.type == "cuda":
        assert (normed == unfused_normed).float().mean() >= 0.99


def test_fp32_weights_with_low_precision_outputs() -> None:
    code = make_code(9, 1024, "repeat", values="sign")
    weight, bias = norm_params(1024, torch.float32, layer_norm=True, seed=3)
    assert_matches_reference(boundary_ids(code, 50, seed=3), code, weight, bias, torch.bfloat16, closed_form=True)


@pytest.mark.parametrize("vocab_size", [1000, 2**16 + 1, 2**31])
def test_vocab_not_a_power_of_two_and_widest_code(vocab_size: int) -> None:
    code = BinaryCode(vocab_size, 64, layout="repeat", bit_order="msb")
    for layer_norm in (True, False):
        weight, bias = norm_params(64, torch.float32, layer_norm, seed=4)
        assert_matches_reference(boundary_ids(code, 40, seed=4), code, weight, bias, torch.float32, True)


def test_multi_dimensional_and_empty_ids() -> None:
    code = make_code(9, 64, "repeat")
    weight, bias = norm_params(64, torch.float32, layer_norm=True, seed=5)
    ids = boundary_ids(code, 12, seed=5).to(torch.int32).view(3, 4)
    residual, normed = fused_code_norm(ids, code, weight, bias, EPS, torch.float32)
    assert residual.shape == normed.shape == (3, 4, 64)
    torch.testing.assert_close(normed, reference_code_norm(ids, code, weight, bias, EPS, torch.float32)[1])
    empty = fused_code_norm(ids[:0].flatten(), code, weight, bias, EPS, torch.float32)
    assert [t.shape for t in empty] == [(0, 64), (0, 64)]


@pytest.mark.parametrize("bad_id", [-1, 1000, 1023])
def test_out_of_range_ids_are_rejected_before_launch(bad_id: int, monkeypatch: pytest.MonkeyPatch) -> None:
    code = make_code(10, 64, "repeat", vocab_size=1000)
    weight, bias = norm_params(64, torch.float32, layer_norm=True, seed=6)

    def launch_must_not_happen(*args, **kwargs):
        raise AssertionError("the kernel was launched with an out-of-range id")

    monkeypatch.setattr(code_norm_triton, "code_norm_kernel", launch_must_not_happen)
    ids = torch.tensor([0, 5, bad_id, 999], device=DEVICE)
    with pytest.raises(ValueError, match=f"token id {bad_id} is out of vocabulary"):
        fused_code_norm(ids, code, weight, bias, EPS, torch.float32)


def test_input_checks() -> None:
    code = make_code(9, 64, "repeat")
    weight, bias = norm_params(64, torch.float32, layer_norm=True, seed=7)
    ids = torch.arange(8, device=DEVICE)
    with pytest.raises(TypeError, match="integer"):
        fused_code_norm(ids.float(), code, weight, bias, EPS, torch.float32)
    with pytest.raises(ValueError, match="ids must be contiguous"):
        fused_code_norm(ids.view(2, 4).t(), code, weight, bias, EPS, torch.float32)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(64,\)"):
        fused_code_norm(ids, code, weight[:32], bias, EPS, torch.float32)
    with pytest.raises(ValueError, match="norm_bias is on meta"):
        fused_code_norm(ids, code, weight, bias.to("meta"), EPS, torch.float32)
    with pytest.raises(ValueError, match="at most 31 bits"):
        fused_code_norm(ids, BinaryCode(2**32, 64, layout="repeat"), weight, bias, EPS, torch.float32)


def test_fused_kernel_enabled_only_on_cuda_and_not_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(code_norm.DISABLE_ENV, raising=False)
    assert fused_kernel_enabled("cuda") and fused_kernel_enabled(torch.device("cuda", 1))
    assert not fused_kernel_enabled("cpu")
    monkeypatch.setenv(code_norm.DISABLE_ENV, "1")
    assert not fused_kernel_enabled("cuda")


def test_module_imports_without_triton() -> None:
    """Engine model classes import fmbc_kernels on CPU-only installs: it must load and fall back cleanly."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from fmbc_kernels import fused_code_norm, fused_kernel_enabled, reference_code_norm\n"
        "from fmbc_serve.binary_code import BinaryCode\n"
        "code = BinaryCode(16, 8, layout='repeat')\n"
        "assert not fused_kernel_enabled('cuda')\n"
        "reference_code_norm(torch.arange(16), code, torch.ones(8), None, 1e-5, torch.float32)\n"
        "try:\n"
        "    fused_code_norm(torch.arange(16), code, torch.ones(8), None, 1e-5, torch.float32)\n"
        "except RuntimeError as err:\n"
        "    assert 'needs triton' in str(err)\n"
        "else:\n"
        "    raise AssertionError('fused_code_norm ran without triton')\n"
    )
    subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, check=True, timeout=120)


def op_args(code: BinaryCode, ids: torch.Tensor, dtype: torch.dtype) -> tuple:
    tables = code_norm.code_tables(code, ids.device)
    weight, bias = norm_params(code.width, dtype, layer_norm=True, seed=8)
    return (ids, tables.width_bits, tables.bit_counts, tables.affine_rows, code.affine_bias, code.low_value,
            code.high_value, weight, bias, EPS, dtype, True)


def test_custom_op_passes_opcheck() -> None:
    """Schema, fake (meta) implementation and the AOT-dispatch path, as torch.compile will use them."""
    code = make_code(16, 64, "interleave", affine=True)
    torch.library.opcheck(torch.ops.fmbc.code_norm.default, op_args(code, boundary_ids(code, 10, 9), torch.bfloat16))


def test_fake_implementation_gives_shapes_and_dtypes() -> None:
    from torch._subclasses import FakeTensorMode

    code = make_code(9, 1000, "repeat")
    args = op_args(code, torch.zeros(5, 7, dtype=torch.int64), torch.float16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_args = [mode.from_tensor(arg) if isinstance(arg, torch.Tensor) else arg for arg in args]
        residual, normed = torch.ops.fmbc.code_norm(*fake_args)
    assert residual.shape == normed.shape == (5, 7, 1000)
    assert residual.dtype == normed.dtype == torch.float16


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_custom_op_under_torch_compile(backend: str) -> None:
    """fullgraph with dynamic token counts: the op stays one opaque node (Inductor on CPU takes ~20 s)."""
    code = make_code(16, 64, "repeat", affine=True, values="sign")
    weight, bias = norm_params(64, torch.bfloat16, layer_norm=True, seed=10)

    def embed_and_norm(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_code_norm(ids, code, weight, bias, EPS, torch.bfloat16, check_ids=False)

    compiled = torch.compile(embed_and_norm, backend=backend, fullgraph=True, dynamic=True)
    for num_tokens in (17, 40):
        ids = boundary_ids(code, num_tokens, seed=num_tokens)
        for got, expected in zip(compiled(ids), embed_and_norm(ids), strict=True):
            assert torch.equal(got, expected)


def test_benchmark_script_runs() -> None:
    """scripts/kernel_benchmark.py (tiny sizes under the interpreter; the real sizes on a GPU)."""
    result = subprocess.run([sys.executable, "scripts/kernel_benchmark.py"], cwd=REPO_ROOT, env=dict(os.environ),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "speedup vs learned" in result.stdout


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA-graph capture needs a CUDA device")
def test_cuda_graph_capture_replays_with_new_ids() -> None:
    code = make_code(16, 256, "interleave", values="sign", scale=0.5)
    weight, bias = norm_params(256, torch.bfloat16, layer_norm=True, seed=11)
    static_ids = boundary_ids(code, 64, seed=11)

    def embed_and_norm() -> tuple[torch.Tensor, torch.Tensor]:
        return fused_code_norm(static_ids, code, weight, bias, EPS, torch.bfloat16, check_ids=False)

    embed_and_norm()  # builds the cached tables outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = embed_and_norm()
    static_ids.copy_(boundary_ids(code, 64, seed=12))
    graph.replay()
    for got, expected in zip(captured, embed_and_norm(), strict=True):
        assert torch.equal(got, expected)
