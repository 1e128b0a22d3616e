"""The shared load policy on quantized layers, without an engine: parameters stand in for what an engine's
quantization method makes (here: int8 `weight` + `weight_scale` on every projection)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fmbc_serve.checkpoint import make_config
from fmbc_serve.weights import canonical_tensors, engine_name, load_canonical_weights

CONFIG = make_config("tiny")
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
               "mlp.down_proj")


def quantized_checkpoint() -> dict[str, torch.Tensor]:
    """Canonical tensors, with every projection as int8 weight + per-channel scale (compressed-tensors W8A8)."""
    tensors = {name: torch.zeros(shape) for name, shape in canonical_tensors(CONFIG).items()}
    for name in list(tensors):
        if name.rpartition(".")[0].endswith(PROJECTIONS):
            tensors[name] = tensors[name].to(torch.int8)
            tensors[name.replace(".weight", ".weight_scale")] = torch.ones(tensors[name].shape[0], 1)
    return tensors


def engine_model(layers: range = range(2)):
    """Engine-like parameters for `layers` (others belong to another pipeline stage), each loader recording."""
    calls: list[tuple[str, str | None]] = []
    params: dict[str, nn.Parameter] = {}
    for name, tensor in quantized_checkpoint().items():
        target, _ = engine_name(name)
        if target.startswith("model.layers.") and int(target.split(".")[2]) not in layers:
            continue
        shape = list(tensor.shape)
        if ".qkv_proj." in target:
            shape[0] *= 3
        param = nn.Parameter(torch.zeros(shape, dtype=tensor.dtype), requires_grad=False)

        def loader(p, w, shard=None, target=target):
            assert w.shape[-1] == p.shape[-1], f"mismatch {list(w.shape)} vs {list(p.shape)}"
            calls.append((target, shard))

        param.weight_loader = loader
        params[target] = param
    return SimpleNamespace(named_parameters=lambda: params.items()), params, calls


def test_quantized_layers_load_through_their_own_parameters() -> None:
    model, params, calls = engine_model()
    loaded = load_canonical_weights(model, quantized_checkpoint().items(), CONFIG, lambda p, w: None)
    assert loaded == set(params)
    assert ("model.layers.1.self_attn.qkv_proj.weight_scale", "k") in calls


def test_missing_and_misshaped_quantized_tensors_are_named() -> None:
    model, _, _ = engine_model()
    tensors = quantized_checkpoint()
    del tensors["model.layers.1.self_attn.k_proj.weight_scale"]
    tensors["model.layers.0.mlp.down_proj.weight_scale"] = torch.ones(128, 3)
    tensors["model.layers.0.mlp.down_proj.weight_zero_point"] = torch.zeros(128, 1)
    with pytest.raises(ValueError) as err:
        load_canonical_weights(model, tensors.items(), CONFIG, lambda p, w: None)
    message = str(err.value)
    assert "missing tensor model.layers.1.self_attn.k_proj.weight_scale" in message
    assert "tensor model.layers.0.mlp.down_proj.weight_scale has shape [128, 3]" in message
    assert "unexpected tensor model.layers.0.mlp.down_proj.weight_zero_point" in message


def test_other_stages_quantized_tensors_are_not_errors_but_strangers_are() -> None:
    model, params, _ = engine_model(layers=range(1))  # this stage holds layer 0
    tensors = quantized_checkpoint()
    loaded = load_canonical_weights(model, tensors.items(), CONFIG, lambda p, w: None,
                                    is_elsewhere=lambda name: name not in params)
    assert loaded == set(params)
    tensors["model.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"unexpected tensor model\.extra\.weight"):
        load_canonical_weights(model, tensors.items(), CONFIG, lambda p, w: None,
                               is_elsewhere=lambda name: name not in params)
