"""Checkpoints with one defect each, and the words the one load policy (`fmbc_serve.weights`) refuses them with.

The same table is loaded by both engines (tests/engines/test_load_policy.py), by the policy alone on an engine-like
model and by `fmbc inspect` (tests/unit/test_weights.py): each case must be refused before serving, with the same
message everywhere. `ACCEPTED` are departures that load correctly.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _add(name: str, tensor: torch.Tensor) -> Callable[[Tensors], None]:
    return lambda tensors: tensors.__setitem__(name, tensor)


def _retype(name: str, dtype: torch.dtype) -> Callable[[Tensors], None]:
    return lambda tensors: tensors.__setitem__(name, tensors[name].to(dtype))


def _quantize_layer_1(tensors: Tensors) -> None:
    """Layer 1's attention as int8 weights with per-channel scales (compressed-tensors W8A8 names)."""
    for proj in PROJECTIONS:
        name = f"model.layers.1.self_attn.{proj}.weight"
        tensors[name] = tensors[name].to(torch.int8)
        tensors[name.replace(".weight", ".weight_scale")] = torch.ones(tensors[name].shape[0], 1)


# case -> (what it does to the tiny checkpoint's tensors, the message every reader refuses it with)
REFUSED: dict[str, tuple[Callable[[Tensors], None], str]] = {
    "stray tensor": (_add("model.extra.weight", torch.zeros(2)), "unexpected tensor model.extra.weight (shape [2])"),
    "stray tensor inside a layer": (
        _add("model.layers.0.self_attn.rotary_emb.inv_freq", torch.zeros(16)),
        "unexpected tensor model.layers.0.self_attn.rotary_emb.inv_freq (shape [16])"),
    "table in a fixed-code checkpoint": (
        _add("model.embed_tokens.weight", torch.zeros(512, 128)),
        "unexpected tensor model.embed_tokens.weight (shape [512, 128])"),
    "stray weight_scale, no quantization_config": (
        _add("model.layers.1.mlp.up_proj.weight_scale", torch.ones(512, 1)),
        "tensor model.layers.1.mlp.up_proj.weight_scale (shape [512, 1]) is a quantization tensor of "
        "model.layers.1.mlp.up_proj, but config.json has no quantization_config"),
    "quantized layer, no quantization_config": (
        _quantize_layer_1,
        "tensor model.layers.1.self_attn.k_proj.weight is int8, not a floating-point weight: a quantized weight "
        "needs its layer's scales and a quantization_config in config.json"),
    "int8 weight": (
        _retype("model.layers.0.mlp.down_proj.weight", torch.int8),
        "tensor model.layers.0.mlp.down_proj.weight is int8, not a floating-point weight"),
    "fp8 weight": (
        _retype("model.layers.1.self_attn.q_proj.weight", torch.float8_e4m3fn),
        "tensor model.layers.1.self_attn.q_proj.weight is float8_e4m3fn, not a floating-point weight"),
    "missing tensor": (
        lambda tensors: tensors.pop("model.layers.1.self_attn.v_proj.weight"),
        "missing tensor model.layers.1.self_attn.v_proj.weight (expected shape [128, 128])"),
    "mis-shaped tensor": (
        lambda tensors: tensors.__setitem__("model.layers.0.self_attn.o_proj.weight",
                                            tensors["model.layers.0.self_attn.o_proj.weight"][:64]),
        "tensor model.layers.0.self_attn.o_proj.weight has shape [64, 128], expected [128, 128]"),
}

# case -> what it does; each loads and computes the reference's model
ACCEPTED: dict[str, Callable[[Tensors], None]] = {
    "bfloat16 weights under a float32 config": lambda tensors: tensors.update(
        {name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}),
}


def write_variant(good: str | Path, out: Path, change: Callable[[Tensors], None]) -> str:
    """A copy of the checkpoint folder `good` at `out`, its tensors changed by `change`."""
    shutil.copytree(good, out)
    tensors = load_file(out / "model.safetensors")
    change(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)

