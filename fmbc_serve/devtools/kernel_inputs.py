"""Seeded inputs for the fused code + norm kernel, shared by its correctness test (tests/unit/test_kernel.py) and
its benchmark (scripts/kernel_benchmark.py), so that the benchmark times the inputs the test checks."""

from __future__ import annotations

import torch

from ..binary_code import BinaryCode

# The GPU when there is one (the kernel's own device), else the CPU, where the kernel runs under the interpreter.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS = 1e-5


def boundary_ids(code: BinaryCode, num_tokens: int, seed: int) -> torch.Tensor:
    """0 and V-1 (= 2^K-1 when V = 2^K) first, random ids after, on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, code.vocab_size, (num_tokens,), generator=generator)
    ids[: min(2, num_tokens)] = torch.tensor([0, code.vocab_size - 1])[: min(2, num_tokens)]
    return ids.to(DEVICE)


def norm_params(width: int, dtype: torch.dtype, layer_norm: bool, seed: int) -> tuple[torch.Tensor,
                                                                                      torch.Tensor | None]:
    """A norm's weight (around 1) and, for LayerNorm, its bias (around 0), seeded, on DEVICE; RMSNorm has no
    bias (None)."""
    generator = torch.Generator().manual_seed(seed)
    weight = (1 + 0.5 * torch.randn(width, generator=generator)).to(dtype)
    bias = (0.5 * torch.randn(width, generator=generator)).to(DEVICE, dtype) if layer_norm else None
    return weight.to(DEVICE), bias
