"""The one input stage and the weight schema that every engine shares with the reference.

The input stage takes the fused kernel where `fused_kernel_enabled` allows it and the torch path otherwise, with
the same result, and always the modules the model holds at the call (a PEFT adapter that replaced the learned
table is used). On CPU the kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1), so the
dispatch the engines use on CUDA is exercised here by forcing the switch on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fmbc_serve import modeling_fmbc
from fmbc_serve.binary_code import FixedCodeInput
from fmbc_serve.checkpoint import make_config
from fmbc_serve.modeling_fmbc import FMBCForCausalLM, input_stage
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
    code = FixedCodeInput(config.binary_code())

    def stage(ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return input_stage(code, norm, config.norm_eps, ids, dtype)

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
        normed, residual = input_stage(model.model.embed_tokens, model.model.layers[0].input_layernorm,
                                       model.config.norm_eps, ids, torch.float32)
    assert torch.equal(residual, model.model.embed_tokens(ids))
    assert torch.equal(normed, model.model.layers[0].input_layernorm(residual))


@pytest.mark.parametrize("overrides", [
    {"preset": "tiny"},
    {"preset": "tiny-learned", "norm_type": "rmsnorm"},
    {"preset": "tiny-affine", "attention_bias": True, "mlp_bias": True, "intermediate_size": 200},
    {"preset": "tiny", "block_style": "parallel"},
    {"preset": "tiny-learned", "block_style": "parallel_shared_norm", "lm_head_bias": True},
])
def test_weight_schema_is_the_reference_state_dict(overrides: dict) -> None:
    """The engines' schema (computed from the config alone) names exactly the reference's tensors."""
    config = make_config(**overrides)
    with torch.device("meta"):
        reference = {name: tuple(t.shape) for name, t in FMBCForCausalLM(config).state_dict().items()}
    assert canonical_tensors(config) == reference
    assert list(canonical_tensors(config)) == list(reference)


@pytest.mark.parametrize("adapter", ["lora", "modules_to_save"])
def test_a_peft_adapter_on_the_learned_table_is_used(adapter: str) -> None:
    """PEFT replaces `embed_tokens` by its own module (a LoRA embedding, or a trainable copy); the model must run
    through it, exactly as the merged model does."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = FMBCForCausalLM(make_config("tiny-learned")).eval()
    ids = torch.tensor([[1, 2, 3, 500, 7]])
    with torch.no_grad():
        before = base(ids).logits
    options = ({"target_modules": ["embed_tokens"], "init_lora_weights": False} if adapter == "lora" else
               {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]})
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, **options)).eval()
    if adapter == "modules_to_save":
        with torch.no_grad():  # train the saved copy: a different table than the base's
            model.base_model.model.model.embed_tokens.modules_to_save["default"].weight.mul_(-1)
    with torch.no_grad():
        adapted = model(ids).logits
        merged = model.merge_and_unload()(ids).logits
    assert not torch.allclose(adapted, before)
    torch.testing.assert_close(adapted, merged, atol=1e-5, rtol=1e-5)
