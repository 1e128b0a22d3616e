"""Input code + layer 0's input norm: the fused Triton kernel on CUDA, the torch path elsewhere.

Both engines call `fused_input_norm`. The kernel is used only when `fmbc_kernels.fused_kernel_enabled` says
so (a CUDA device, triton importable, and `FMBC_DISABLE_TRITON` not set to 1); otherwise the lift and the
norm run as two torch ops. Either way the maths is the one in `binary_code.embed_code`.
"""

from __future__ import annotations

import torch
from torch import nn

from .binary_code import FixedCodeInput


def fused_input_norm(code_input: FixedCodeInput, norm: nn.Module, input_ids: torch.Tensor, dtype: torch.dtype,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual stream, normalised input of layer 0) for `input_ids`. `norm` is layer 0's input norm: a
    LayerNorm (weight and bias) or an RMSNorm (weight only)."""
    from fmbc_kernels import fused_code_norm, fused_kernel_enabled

    if fused_kernel_enabled(input_ids.device):
        return fused_code_norm(input_ids, code_input.code, norm.weight, getattr(norm, "bias", None), eps, dtype,
                               check_ids=False)
    hidden = code_input(input_ids, dtype)
    return hidden, norm(hidden)
