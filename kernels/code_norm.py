"""Token ids -> (residual, normed): the lifted binary code and layer 0's input norm, in one kernel launch.

An FMBC model's first decoder layer normalises the lifted code (pre-norm), so the embedding step and that
norm fuse: one launch reads only the int ids and writes both outputs. `fused_code_norm` is the checked
launcher, `reference_code_norm` the pure-torch definition it is tested against (BinaryCode.embed followed
by torch's layer_norm / rms_norm), `fused_kernel_enabled` tells a model whether to take the fused path.

Environment:
    FMBC_DISABLE_TRITON=1  makes `fused_kernel_enabled` return False everywhere, so models fall back to the
                           unfused torch path (to rule the kernel out when debugging, or to compare).

Triton is optional: without it this module still imports, `fused_kernel_enabled` is False and
`fused_code_norm` raises. On CPU the kernel runs only under the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from fmbc_serve.binary_code import BinaryCode, CodeTables

try:
    from . import code_norm_triton  # registers torch.ops.fmbc.code_norm
except ImportError:  # triton is not installed: only the reference path is available
    code_norm_triton = None

DISABLE_ENV = "FMBC_DISABLE_TRITON"
ID_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
MAX_CODE_BITS = 31  # codes are held in int32 inside the kernel


def fused_kernel_enabled(device: torch.device | str) -> bool:
    """True when the fused kernel should serve `device`: CUDA, triton importable, not disabled by env."""
    return (torch.device(device).type == "cuda" and code_norm_triton is not None
            and os.environ.get(DISABLE_ENV) != "1")


def code_tables(code: BinaryCode, device: torch.device) -> CodeTables:
    """The code's own tables (BinaryCode.tables()) on `device`. Cached per (code, device) in eager mode, so a
    launch copies nothing host-to-device (make one eager call before CUDA graph capture). torch.compile traces
    the build instead: static shapes keep it graph-safe and the tables become constants of the graph."""
    if torch.compiler.is_compiling():
        return _tables_on(code, device)
    return _cached_tables_on(code, device)


def _tables_on(code: BinaryCode, device: torch.device) -> CodeTables:
    return code.tables().to(device)


_cached_tables_on = functools.lru_cache(maxsize=64)(_tables_on)


def _check_inputs(ids: torch.Tensor, code: BinaryCode, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"token ids must be an integer tensor ({', '.join(map(str, ID_DTYPES))}), got {ids.dtype}")
    if code.num_bits > MAX_CODE_BITS:
        raise ValueError(f"the kernel supports codes of at most {MAX_CODE_BITS} bits, got K = {code.num_bits}")
    for name, tensor in (("norm_weight", weight), ("norm_bias", bias)):
        if tensor is None:
            continue
        if tensor.shape != (code.width,):
            raise ValueError(f"{name} must have shape ({code.width},), got {tuple(tensor.shape)}")
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {tensor.dtype}")
    for name, tensor in (("ids", ids), ("norm_weight", weight), ("norm_bias", bias)):
        if tensor is None:
            continue
        if tensor.device != ids.device:
            raise ValueError(f"{name} is on {tensor.device} but ids are on {ids.device}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous")


def fused_code_norm(
    ids: torch.Tensor,
    code: BinaryCode,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    check_ids: bool = True,
    *,
    closed_form: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [...] -> (residual, normed), each [..., d] in `out_dtype`, from one kernel launch.

    `norm_bias` None means RMSNorm (weight only), else LayerNorm. The residual holds the code's two values
    rounded to `out_dtype`, and the norm is taken of exactly those, as the unfused model does. `check_ids`
    rejects ids outside [0, V) before the launch (ValueError naming the id); it syncs with the device, so turn
    it off under CUDA graph capture where the caller guarantees the range. `closed_form=False` takes the
    statistics by reduction over d instead of from the bit counts (for benchmarks and cross-checks).
    """
    if code_norm_triton is None:
        raise RuntimeError("fused_code_norm needs triton (pip install 'fmbc-serve[triton]')")
    _check_inputs(ids, code, norm_weight, norm_bias)
    if ids.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("on CPU the Triton kernel runs only under TRITON_INTERPRET=1 (set before importing "
                           "triton); use reference_code_norm instead")
    if check_ids:
        code.check_ids(ids)
    tables = code_tables(code, ids.device)
    return torch.ops.fmbc.code_norm(
        ids, tables.width_bits, tables.bit_counts, tables.affine_rows, code.affine_bias,
        code.low_value, code.high_value,
        norm_weight, norm_bias, eps, out_dtype, closed_form,
    )


def reference_code_norm(
    ids: torch.Tensor,
    code: BinaryCode,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused definition: residual = code.embed(ids) in `out_dtype`, normed = its norm taken in fp32."""
    residual = code.embed(ids, out_dtype)
    x, shape, weight = residual.float(), (code.width,), norm_weight.float()
    if norm_bias is None:
        normed = F.rms_norm(x, shape, weight, eps)
    else:
        normed = F.layer_norm(x, shape, weight, norm_bias.float(), eps)
    return residual, normed.to(out_dtype)
