"""fmbc_kernels: Triton kernels for FMBC models (installed from kernels/ under this name, see pyproject).

`fused_code_norm` turns token ids into the lifted binary code and layer 0's normalised input in one launch;
set FMBC_DISABLE_TRITON=1 to make `fused_kernel_enabled` refuse it (details in code_norm.py, docs/kernel.md).
"""

from .code_norm import fused_code_norm, fused_kernel_enabled, reference_code_norm

__all__ = ["fused_code_norm", "fused_kernel_enabled", "reference_code_norm"]
