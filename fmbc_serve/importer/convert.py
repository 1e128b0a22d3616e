"""Foreign tensors under our canonical names: q/k/v split from a fused projection (either order), interleaved
rotary pairs permuted into rotate-half form (exact: q·k is unchanged), GPT-2 Conv1D transposed, zero biases
where our config needs them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .structure import BlockLayout, matrix, norm_shift, norm_tensors

if TYPE_CHECKING:
    from .attention import Attention


def split_qkv(weights: list[torch.Tensor], conv: Attention, width: int) -> list[torch.Tensor]:
    """q, k, v weights (or biases) in our rotate-half form."""
    if len(weights) == 1:
        fused = weights[0]
        if conv.fused_order == "qkv":
            parts = list(fused.split(width, dim=0))
        else:
            per_head = fused.reshape(conv.heads, 3, width // conv.heads, *fused.shape[1:])
            parts = [per_head[:, i].reshape(width, *fused.shape[1:]) for i in range(3)]
    else:
        parts = list(weights)
    if conv.rotary == "interleaved":  # pairs (2i, 2i+1) -> (i, i + r/2): exact, q·k is unchanged
        head_dim = width // conv.heads
        r = conv.rotary_dim
        perm = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, head_dim)])
        parts[:2] = [p.reshape(conv.heads, head_dim, *p.shape[1:])[:, perm].reshape(p.shape) for p in parts[:2]]
    return [p.contiguous() for p in parts]


def convert_block(block: nn.Module, layout: BlockLayout, conv: Attention, width: int, prefix: str
                  ) -> dict[str, torch.Tensor]:
    """One foreign block's tensors under our canonical names (`prefix` = "model.layers.{i}")."""
    get = block.get_submodule
    out: dict[str, torch.Tensor] = {}
    norms = [("input_layernorm", layout.attn_norm)] + (
        [("post_attention_layernorm", layout.mlp_norm)] if layout.mlp_norm else [])  # GPT-J's one norm: no second
    for ours, theirs in norms:
        out[f"{prefix}.{ours}.weight"] = norm_tensors(get(theirs))[0].detach()
        out[f"{prefix}.{ours}.bias"] = norm_shift(get(theirs)).detach()
    qkv = [get(n) for n in layout.qkv]
    names = ("q_proj", "k_proj", "v_proj")
    for name, weight in zip(names, split_qkv([matrix(m).detach() for m in qkv], conv, width), strict=True):
        out[f"{prefix}.self_attn.{name}.weight"] = weight
    biases = [getattr(m, "bias", None) for m in qkv]
    if any(b is not None for b in biases):
        full = [torch.zeros(m.weight.numel() // width) if b is None else b.detach() for m, b in zip(qkv, biases,
                                                                                                    strict=True)]
        for name, bias in zip(names, split_qkv(full, conv, width), strict=True):
            out[f"{prefix}.self_attn.{name}.bias"] = bias
    for ours, theirs in (("self_attn.o_proj", layout.out), ("mlp.up_proj", layout.up), ("mlp.down_proj", layout.down)):
        module = get(theirs)
        out[f"{prefix}.{ours}.weight"] = matrix(module).detach().contiguous()
        if getattr(module, "bias", None) is not None:
            out[f"{prefix}.{ours}.bias"] = module.bias.detach()
    return out


def complete(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Exactly the `expected` tensors: zero biases where the foreign model has none but our config needs them
    (e.g. k has a bias, o has not), and no biases the config lacks (an RMSNorm, a LayerNorm without bias)."""
    return {name: tensors[name] if name in tensors else torch.zeros(shape) for name, shape in expected.items()}
