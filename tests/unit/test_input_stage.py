"""The one input stage and the weight schema that every engine shares with the reference.

The input stage takes the fused kernel where `fused_kernel_enabled` allows it and the torch path otherwise, with
the same result. On CPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so the
dispatch the engines use on CUDA is exercised here by forcing the switch on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fmbc_serve import modeling_fmbc
from fmbc_serve.binary_code import FixedCodeInput
from fmbc_serve.checkpoint import make_config
from fmbc_serve.modeling_fmbc import FMBCForCausalLM, FMBCInputStage
from fmbc_serve.weights import canonical_tensors

pytest.importorskip("triton")


@pytest.mark.parametrize(("preset", "norm_type"), [("tiny", "layernorm"), ("tiny-affine", "rmsnorm")])
def test_fused_path_equals_torch_path(monkeypatch: pytest.MonkeyPatch, preset: str, norm_type: str) -> None:
    config = make_config(preset, norm_type=norm_type)
    norm = nn.LayerNorm(128, eps=config.norm_eps) if norm_type == "layernorm" else nn.RMSNorm(128, eps=config.norm_eps)
    with torch.no_grad():
        norm.weight.normal_()
        if norm_type == "layernorm":
            norm.bias.normal_()
    stage = FMBCInputStage(FixedCodeInput(config.binary_code()), norm, config.norm_eps)
    ids = torch.tensor([0, 1, 255, 511, 300, 7])
    with torch.no_grad():
        torch_normed, torch_residual = stage(ids, torch.float32)
    calls = []
    real = modeling_fmbc.fused_code_norm

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling_fmbc, "fused_kernel_enabled", lambda device: True)
    monkeypatch.setattr(modeling_fmbc, "fused_code_norm", spy)
    with torch.no_grad():
        normed, residual = stage(ids, torch.float32)
    assert calls == [{"check_ids": False}]
    assert torch.equal(residual, torch_residual)
    torch.testing.assert_close(normed, torch_normed, atol=1e-5, rtol=1e-5)


def test_switch_is_off_on_cpu_and_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not modeling_fmbc.fused_kernel_enabled(torch.device("cpu"))
    monkeypatch.setenv("FMBC_DISABLE_TRITON", "1")
    assert not modeling_fmbc.fused_kernel_enabled(torch.device("cuda"))


def test_learned_table_never_takes_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    model = FMBCForCausalLM(make_config("tiny-learned")).eval()
    monkeypatch.setattr(modeling_fmbc, "fused_kernel_enabled", lambda device: True)
    ids = torch.tensor([3, 4, 5])
    with torch.no_grad():
        normed, residual = model.model.input_stage(ids, torch.float32)
    assert torch.equal(residual, model.model.embed_tokens(ids))
    assert torch.equal(normed, model.model.layers[0].input_layernorm(residual))


@pytest.mark.parametrize("overrides", [
    {"preset": "tiny"},
    {"preset": "tiny-learned", "norm_type": "rmsnorm"},
    {"preset": "tiny-affine", "attention_bias": True, "mlp_bias": True, "intermediate_size": 200},
])
def test_weight_schema_is_the_reference_state_dict(overrides: dict) -> None:
    """The engines' schema (computed from the config alone) names exactly the reference's tensors."""
    config = make_config(**overrides)
    with torch.device("meta"):
        reference = {name: tuple(t.shape) for name, t in FMBCForCausalLM(config).state_dict().items()}
    assert canonical_tensors(config) == reference
    assert list(canonical_tensors(config)) == list(reference)
