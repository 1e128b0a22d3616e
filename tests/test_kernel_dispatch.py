"""The engines' input step: the fused kernel where `fused_kernel_enabled` allows it, the torch path otherwise,
with the same result. On CPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1),
so the dispatch the engines use on CUDA is exercised here by forcing the switch on."""

from __future__ import annotations

import fmbc_kernels
import pytest
import torch
from torch import nn

from fmbc_serve.binary_code import FixedCodeInput
from fmbc_serve.checkpoint import make_config
from fmbc_serve.kernel_dispatch import fused_input_norm

pytest.importorskip("triton")


@pytest.mark.parametrize(("preset", "norm_type"), [("tiny", "layernorm"), ("tiny-affine", "rmsnorm")])
def test_fused_path_equals_torch_path(monkeypatch: pytest.MonkeyPatch, preset: str, norm_type: str) -> None:
    config = make_config(preset, norm_type=norm_type)
    code_input = FixedCodeInput(config.binary_code())
    norm = nn.LayerNorm(128, eps=config.norm_eps) if norm_type == "layernorm" else nn.RMSNorm(128, eps=config.norm_eps)
    with torch.no_grad():
        norm.weight.normal_()
        if norm_type == "layernorm":
            norm.bias.normal_()
    ids = torch.tensor([0, 1, 255, 511, 300, 7])
    with torch.no_grad():
        torch_residual, torch_normed = fused_input_norm(code_input, norm, ids, torch.float32, config.norm_eps)
    calls = []
    real = fmbc_kernels.fused_code_norm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(fmbc_kernels, "fused_kernel_enabled", lambda device: True)
    monkeypatch.setattr(fmbc_kernels, "fused_code_norm", spy)
    with torch.no_grad():
        residual, normed = fused_input_norm(code_input, norm, ids, torch.float32, config.norm_eps)
    assert calls == [{"check_ids": False}]
    assert torch.equal(residual, torch_residual)
    torch.testing.assert_close(normed, torch_normed, atol=1e-5, rtol=1e-5)


def test_switch_is_off_on_cpu_and_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not fmbc_kernels.fused_kernel_enabled("cpu")
    monkeypatch.setenv("FMBC_DISABLE_TRITON", "1")
    assert not fmbc_kernels.fused_kernel_enabled("cuda")
