"""Foreign tensors under our canonical names: q/k/v split from a fused projection (either order), interleaved
rotary pairs permuted into rotate-half form (exact: q·k is unchanged), GPT-2 Conv1D transposed, zero biases
where our config needs them. `name_mapping` says the same renaming to the report."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..configuration_fmbc import FMBCConfig
from ..weights import canonical_tensors
from .structure import BlockLayout, Structure, matrix, norm_shift, norm_tensors

QKV_NAMES = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Attention:
    """The attention conventions a conversion follows (found by `attention.recognise_attention`)."""

    heads: int
    fused_order: str | None  # a fused qkv's order: "qkv" (stacked) or "per_head" (GPT-NeoX); None: separate q/k/v
    rotary: str  # "rotate_half" or "interleaved"
    rotary_dim: int
    theta: float


def norm_pairs(layout: BlockLayout) -> list[tuple[str, str]]:
    """(our norm, the foreign one) of a block; GPT-J's one shared norm has no second."""
    return [("input_layernorm", layout.attn_norm)] + (
        [("post_attention_layernorm", layout.mlp_norm)] if layout.mlp_norm else [])


def projection_pairs(layout: BlockLayout) -> list[tuple[str, str]]:
    """(ours, the foreign one) for a block's output projection and MLP (q/k/v are split: `split_qkv`)."""
    return [("self_attn.o_proj", layout.out), ("mlp.up_proj", layout.up), ("mlp.down_proj", layout.down)]


def split_qkv(weights: list[torch.Tensor], attention: Attention, width: int) -> list[torch.Tensor]:
    """q, k, v weights (or biases) in our rotate-half form."""
    if len(weights) == 1:
        fused = weights[0]
        if attention.fused_order == "qkv":
            parts = list(fused.split(width, dim=0))
        else:
            per_head = fused.reshape(attention.heads, 3, width // attention.heads, *fused.shape[1:])
            parts = [per_head[:, i].reshape(width, *fused.shape[1:]) for i in range(3)]
    else:
        parts = list(weights)
    if attention.rotary == "interleaved":  # pairs (2i, 2i+1) -> (i, i + r/2): exact, q·k is unchanged
        head_dim = width // attention.heads
        r = attention.rotary_dim
        perm = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, head_dim)])
        parts[:2] = [p.reshape(attention.heads, head_dim, *p.shape[1:])[:, perm].reshape(p.shape) for p in parts[:2]]
    return [p.contiguous() for p in parts]


def convert_block(block: nn.Module, layout: BlockLayout, attention: Attention, width: int, prefix: str
                  ) -> dict[str, torch.Tensor]:
    """One foreign block's tensors under our canonical names (`prefix` = "model.layers.{i}")."""
    get = block.get_submodule
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in norm_pairs(layout):
        out[f"{prefix}.{ours}.weight"] = norm_tensors(get(theirs))[0].detach()
        out[f"{prefix}.{ours}.bias"] = norm_shift(get(theirs)).detach()
    qkv = [get(n) for n in layout.qkv]
    for name, weight in zip(QKV_NAMES, split_qkv([matrix(m).detach() for m in qkv], attention, width), strict=True):
        out[f"{prefix}.self_attn.{name}.weight"] = weight
    biases = [getattr(m, "bias", None) for m in qkv]
    if any(b is not None for b in biases):
        full = [torch.zeros(m.weight.numel() // width) if b is None else b.detach() for m, b in zip(qkv, biases,
                                                                                                   strict=True)]
        for name, bias in zip(QKV_NAMES, split_qkv(full, attention, width), strict=True):
            out[f"{prefix}.self_attn.{name}.bias"] = bias
    for ours, theirs in projection_pairs(layout):
        module = get(theirs)
        out[f"{prefix}.{ours}.weight"] = matrix(module).detach().contiguous()
        if getattr(module, "bias", None) is not None:
            out[f"{prefix}.{ours}.bias"] = module.bias.detach()
    return out


def convert_model(model: nn.Module, structure: Structure, attention: Attention, config: FMBCConfig,
                  input_table: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor of our checkpoint for `config`: each block's, the final norm's, the head's and, for a learned
    input, `input_table` (the foreign first block's input for every id). Views of the foreign tensors wherever
    nothing changes."""
    tensors: dict[str, torch.Tensor] = {}
    for i, block in enumerate(structure.blocks):
        tensors.update(convert_block(block, structure.layout, attention, structure.width, f"model.layers.{i}"))
    final_norm, head = model.get_submodule(structure.final_norm_name), model.get_submodule(structure.head_name)
    tensors["model.norm.weight"] = norm_tensors(final_norm)[0].detach()
    tensors["model.norm.bias"] = norm_shift(final_norm).detach()
    tensors["lm_head.weight"] = matrix(head).detach()
    if config.lm_head_bias:
        tensors["lm_head.bias"] = head.bias.detach()
    if config.input_mode == "learned":
        tensors["model.embed_tokens.weight"] = input_table
    return complete(tensors, canonical_tensors(config))


def complete(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Exactly the `expected` tensors: zero biases where the foreign model has none but our config needs them
    (e.g. k has a bias, o has not), and no biases the config lacks (an RMSNorm, a LayerNorm without bias)."""
    return {name: tensors[name] if name in tensors else torch.zeros(shape) for name, shape in expected.items()}


def name_mapping(structure: Structure, input_mode: str) -> dict[str, str]:
    """Foreign module -> ours, for the report (`{i}` stands for every block index)."""
    layout = structure.layout
    if len(layout.qkv) == 1:
        qkv = [("self_attn.q_proj + k_proj + v_proj", layout.qkv[0])]
    else:
        qkv = [(f"self_attn.{ours}", theirs) for ours, theirs in zip(QKV_NAMES, layout.qkv, strict=True)]
    names = {f"{structure.stack_name}.{{i}}.{theirs}": f"model.layers.{{i}}.{ours}"
             for ours, theirs in [*norm_pairs(layout), *qkv, *projection_pairs(layout)]}
    names[structure.final_norm_name] = "model.norm"
    names[structure.head_name] = "lm_head"
    names["(first block input)"] = ("model.embed_tokens.weight" if input_mode == "learned"
                                    else "model.embed_tokens (fixed code, no tensor)")
    return names
