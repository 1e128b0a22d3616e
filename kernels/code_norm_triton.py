"""The fused code + first-norm Triton kernel and its `torch.ops.fmbc.code_norm` custom op.

Importing this module needs triton; `code_norm.py` guards the import so the package still loads without it.
The op is a `torch.library.custom_op` with a fake implementation, so torch.compile keeps it as one opaque
node and CUDA graphs capture its launch. (A `triton_op` would let Inductor see inside, but under
TRITON_INTERPRET=1 torch hands fake tensors straight to the interpreter, so it could not be compiled or
checked on CPU; one elementwise launch gains nothing from being inlined.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# Elements of one [BLOCK_T, BLOCK_D] tile under the interpreter, which pays a fixed cost per program (docs/kernel.md):
# big tiles.
INTERPRETER_TILE_ELEMENTS = 16384
MAX_ROWS_PER_PROGRAM = 64
# The widest global store (128-bit), and the most warps per program the launcher uses.
STORE_BYTES = 16
MAX_WARPS = 16
# An SM holds at most 32 programs (blocks) but 64 warps: programs of one warp could fill only half of it.
MIN_WARPS = 2


class LaunchConfig(NamedTuple):
    """How the kernel is launched for one width: BLOCK_T rows (tokens) of BLOCK_D columns per program."""

    block_t: int
    block_d: int  # next power of two >= d; the columns past d are masked
    num_warps: int


def store_bytes(width: int, out_dtype: torch.dtype) -> int:
    """The widest global store a row of d elements allows: a store of n bytes must be n-byte aligned, and row t
    starts at byte t·d·itemsize, so n is the largest power of two dividing the row's size, capped at 16 (d = 1024
    or 1000 in bf16: 16; d = 1001 in bf16: 2, one element per store)."""
    row_bytes = width * out_dtype.itemsize
    return min(STORE_BYTES, row_bytes & -row_bytes)


def launch_config(width: int, out_dtype: torch.dtype, interpreter: bool = False) -> LaunchConfig:
    """The tile and warps the launcher uses for width d, and that tests/unit/test_kernel_compile.py compiles.

    On a GPU each thread holds exactly one store's worth (`store_bytes`) of each output row: with fewer elements
    per thread the stores narrow (`STG.E.64` instead of `STG.E.128`), with more the registers per thread grow
    and fewer warps fit on an SM (the compile sweep in docs/kernel.md). So a program is one row of d / vector
    threads, or, when a row is shorter than two warps' worth of vectors, as many rows as fill two warps. Under
    the interpreter, which pays per program, tiles are big instead.
    """
    block_d = triton.next_power_of_2(width)
    if interpreter:
        return LaunchConfig(max(1, min(MAX_ROWS_PER_PROGRAM, INTERPRETER_TILE_ELEMENTS // block_d)), block_d, 4)
    vector = store_bytes(width, out_dtype) // out_dtype.itemsize
    num_warps = max(MIN_WARPS, min(MAX_WARPS, block_d // (32 * vector)))
    return LaunchConfig(max(1, 32 * vector * num_warps // block_d), block_d, num_warps)


@triton.jit
def _parity(x):
    """Parity of each non-negative int32 by xor-folding (libdevice popc is unavailable in the interpreter)."""
    x ^= x >> 16
    x ^= x >> 8
    x ^= x >> 4
    x ^= x >> 2
    x ^= x >> 1
    return x & 1


@triton.jit(do_not_specialize=["num_tokens"])
def code_norm_kernel(
    ids_ptr, width_bits_ptr, bit_counts_ptr, affine_rows_ptr, weight_ptr, bias_ptr,
    residual_ptr, normed_ptr,
    num_tokens, num_bits, affine_bias, low, high, eps,
    WIDTH: tl.constexpr, HAS_AFFINE: tl.constexpr, LAYER_NORM: tl.constexpr, CLOSED_FORM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """BLOCK_T token ids -> their lifted code (residual) and its LayerNorm/RMSNorm (normed), all in fp32."""
    # The norm must see the residual as stored (as the unfused model does): round the two values first.
    low = tl.full([], low, tl.float32).to(residual_ptr.dtype.element_ty).to(tl.float32)
    high = tl.full([], high, tl.float32).to(residual_ptr.dtype.element_ty).to(tl.float32)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < num_tokens
    codes = tl.load(ids_ptr + rows, mask=row_mask, other=0).to(tl.int32)
    if HAS_AFFINE:  # c'_i = parity(A_i & c) xor b_i
        recoded = tl.zeros([BLOCK_T], dtype=tl.int32)
        for i in range(num_bits):
            recoded |= _parity(codes & tl.load(affine_rows_ptr + i).to(tl.int32)) << i
        codes = recoded ^ affine_bias

    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < WIDTH
    bit_index = tl.load(width_bits_ptr + cols, mask=col_mask, other=0).to(tl.int32)
    is_high = ((codes[:, None] >> bit_index[None, :]) & 1) != 0
    x = tl.where(is_high, high, low)  # [BLOCK_T, BLOCK_D] fp32: only two values per position

    if CLOSED_FORM:  # statistics from the bit counts: O(K) per row, no reduction over d
        num_high = tl.zeros([BLOCK_T], dtype=tl.int32)
        for k in range(num_bits):
            num_high += ((codes >> k) & 1) * tl.load(bit_counts_ptr + k).to(tl.int32)
        p_high = num_high.to(tl.float32) / WIDTH
        if LAYER_NORM:
            mean = low + p_high * (high - low)
            var = p_high * (1.0 - p_high) * (high - low) * (high - low)
        else:
            mean = tl.zeros([BLOCK_T], dtype=tl.float32)
            var = p_high * high * high + (1.0 - p_high) * low * low
    else:  # the generic path: reduce over the row
        if LAYER_NORM:
            mean = tl.sum(tl.where(col_mask[None, :], x, 0.0), axis=1) / WIDTH
        else:
            mean = tl.zeros([BLOCK_T], dtype=tl.float32)
        centered = tl.where(col_mask[None, :], x - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / WIDTH
    rstd = tl.rsqrt(var + eps)

    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    normed = (x - mean[:, None]) * rstd[:, None] * weight[None, :]
    if LAYER_NORM:
        normed += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    offsets = rows.to(tl.int64)[:, None] * WIDTH + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(residual_ptr + offsets, x.to(residual_ptr.dtype.element_ty), mask=mask)
    tl.store(normed_ptr + offsets, normed.to(normed_ptr.dtype.element_ty), mask=mask)


def _empty_outputs(ids: torch.Tensor, width: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    residual = ids.new_empty((*ids.shape, width), dtype=out_dtype)
    return residual, torch.empty_like(residual)


def kernel_arguments(
    ids: torch.Tensor, width_bits: torch.Tensor, bit_counts: torch.Tensor, affine_rows: torch.Tensor,
    affine_bias: int, low: float, high: float, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
    residual: torch.Tensor, normed: torch.Tensor, closed_form: bool, config: LaunchConfig,
) -> tuple[tuple[int], tuple, dict]:
    """(grid, positional arguments, keyword arguments) of one `code_norm_kernel` launch: the one place that maps
    the op's inputs to the kernel's, shared by the launcher and the ahead-of-time compile check
    (`fmbc_kernels.compile_report`), so that the check compiles exactly what the launcher launches."""
    num_tokens = ids.numel()
    grid = (triton.cdiv(num_tokens, config.block_t),)
    args = (ids, width_bits, bit_counts, affine_rows, weight, weight if bias is None else bias, residual, normed,
            num_tokens, bit_counts.shape[0], affine_bias, low, high, eps)
    options = dict(WIDTH=width_bits.shape[0], HAS_AFFINE=affine_rows.shape[0] > 0, LAYER_NORM=bias is not None,
                   CLOSED_FORM=closed_form, BLOCK_T=config.block_t, BLOCK_D=config.block_d,
                   num_warps=config.num_warps)
    return grid, args, options


@torch.library.custom_op("fmbc::code_norm", mutates_args=())
def code_norm(
    ids: torch.Tensor,
    width_bits: torch.Tensor,
    bit_counts: torch.Tensor,
    affine_rows: torch.Tensor,
    affine_bias: int,
    low: float,
    high: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    closed_form: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchecked launch: use `fmbc_kernels.fused_code_norm`, which validates and builds the tables.

    The three tables are `BinaryCode.tables()` (int64) on the ids' device: `width_bits[p]` is the bit of c' at
    width position p, `bit_counts[k]` how many positions hold bit k, `affine_rows` A's rows (empty for no affine
    map). Returns (residual, normed) of shape ids.shape + (d,).
    """
    width = width_bits.shape[0]
    residual, normed = _empty_outputs(ids, width, out_dtype)
    if ids.numel() == 0:
        return residual, normed
    config = launch_config(width, out_dtype, interpreter=ids.device.type == "cpu")
    grid, args, options = kernel_arguments(ids, width_bits, bit_counts, affine_rows, affine_bias, low, high, weight,
                                           bias, eps, residual, normed, closed_form, config)
    code_norm_kernel[grid](*args, **options)
    return residual, normed


@code_norm.register_fake
def _code_norm_fake(ids, width_bits, bit_counts, affine_rows, affine_bias, low, high, weight, bias, eps, out_dtype,
                    closed_form):
    return _empty_outputs(ids, width_bits.shape[0], out_dtype)
