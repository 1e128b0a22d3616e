"""The fused code + first-norm Triton kernel and its `torch.ops.fmbc.code_norm` custom op.

Importing this module needs triton; `code_norm.py` guards the import so the package still loads without it.
The op is a `torch.library.custom_op` with a fake implementation, so torch.compile keeps it as one opaque
node and CUDA graphs capture its launch. (A `triton_op` would let Inductor see inside, but under
TRITON_INTERPRET=1 torch hands fake tensors straight to the interpreter, so it could not be compiled or
checked on CPU; one elementwise launch gains nothing from being inlined.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one [BLOCK_T, BLOCK_D] tile. The interpreter pays ~3.5 ms per program, so it gets big tiles.
GPU_TILE_ELEMENTS = 4096
INTERPRETER_TILE_ELEMENTS = 16384
MAX_ROWS_PER_PROGRAM = 64


@triton.jit
def _parity(x):
    """Parity of each non-negative int32 by xor-folding (libdevice popc is unavailable in the interpreter)."""
    x ^= x >> 16
    x ^= x >> 8
    x ^= x >> 4
    x ^= x >> 2
    x ^= x >> 1
    return x & 1


@triton.jit
def code_norm_kernel(
    ids_ptr, width_bits_ptr, bit_counts_ptr, affine_rows_ptr, weight_ptr, bias_ptr,
    residual_ptr, normed_ptr,
    num_tokens, width, num_bits, affine_bias, low, high, eps,
    HAS_AFFINE: tl.constexpr, LAYER_NORM: tl.constexpr, CLOSED_FORM: tl.constexpr,
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
    col_mask = cols < width
    bit_index = tl.load(width_bits_ptr + cols, mask=col_mask, other=0).to(tl.int32)
    is_high = ((codes[:, None] >> bit_index[None, :]) & 1) != 0
    x = tl.where(is_high, high, low)  # [BLOCK_T, BLOCK_D] fp32: only two values per position

    if CLOSED_FORM:  # statistics from the bit counts: O(K) per row, no reduction over d
        num_high = tl.zeros([BLOCK_T], dtype=tl.int32)
        for k in range(num_bits):
            num_high += ((codes >> k) & 1) * tl.load(bit_counts_ptr + k).to(tl.int32)
        p_high = num_high.to(tl.float32) / width
        if LAYER_NORM:
            mean = low + p_high * (high - low)
            var = p_high * (1.0 - p_high) * (high - low) * (high - low)
        else:
            mean = tl.zeros([BLOCK_T], dtype=tl.float32)
            var = p_high * high * high + (1.0 - p_high) * low * low
    else:  # the generic path: reduce over the row
        if LAYER_NORM:
            mean = tl.sum(tl.where(col_mask[None, :], x, 0.0), axis=1) / width
        else:
            mean = tl.zeros([BLOCK_T], dtype=tl.float32)
        centered = tl.where(col_mask[None, :], x - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / width
    rstd = tl.rsqrt(var + eps)

    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    normed = (x - mean[:, None]) * rstd[:, None] * weight[None, :]
    if LAYER_NORM:
        normed += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    offsets = rows.to(tl.int64)[:, None] * width + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(residual_ptr + offsets, x.to(residual_ptr.dtype.element_ty), mask=mask)
    tl.store(normed_ptr + offsets, normed.to(normed_ptr.dtype.element_ty), mask=mask)


def _empty_outputs(ids: torch.Tensor, width: int, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    residual = ids.new_empty((*ids.shape, width), dtype=out_dtype)
    return residual, torch.empty_like(residual)


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
    num_tokens = ids.numel()
    if num_tokens == 0:
        return residual, normed
    block_d = triton.next_power_of_2(width)
    tile = INTERPRETER_TILE_ELEMENTS if ids.device.type == "cpu" else GPU_TILE_ELEMENTS
    block_t = max(1, min(MAX_ROWS_PER_PROGRAM, tile // block_d))
    grid = (triton.cdiv(num_tokens, block_t),)
    code_norm_kernel[grid](
        ids, width_bits, bit_counts, affine_rows, weight, weight if bias is None else bias,
        residual, normed,
        num_tokens, width, bit_counts.shape[0], affine_bias, low, high, eps,
        HAS_AFFINE=affine_rows.shape[0] > 0, LAYER_NORM=bias is not None, CLOSED_FORM=closed_form,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=max(4, min(16, block_t * block_d // 1024)),
    )
    return residual, normed


@code_norm.register_fake
def _code_norm_fake(ids, width_bits, bit_counts, affine_rows, affine_bias, low, high, weight, bias, eps, out_dtype,
                    closed_form):
    return _empty_outputs(ids, width_bits.shape[0], out_dtype)
