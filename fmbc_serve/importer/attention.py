"""The attention conventions, found by testing: our block run on the foreign first block's recorded input, over
candidate head counts, fused-qkv orders, rotary conventions, rotated dimensions and bases, until its output
matches the foreign block's."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import torch
from torch import nn

from ..configuration_fmbc import FMBCConfig
from ..modeling_fmbc import FMBCDecoderLayer, FMBCRotaryEmbedding
from ..tolerances import FP32_MODULE_MATCH
from ..weights import canonical_tensors
from .convert import Attention, complete, convert_block
from .errors import ImportRefused
from .structure import BlockLayout

# Config keys foreign code uses for the same quantity: hints only, each is tested before it is believed.
HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
THETA_KEYS = ("rope_theta", "rotary_emb_base", "rope_base", "theta", "rotary_base", "base")
FRACTION_KEYS = ("rotary_pct", "partial_rotary_factor", "rotary_emb_fraction", "rope_fraction")
COMMON_THETAS = (10000.0, 500000.0, 1000000.0, 100000.0)


def config_value(config: object, keys: tuple[str, ...]) -> object:
    """The value of the first of `keys` the config sets."""
    return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), None)


def rotary_candidates(model: nn.Module, head_dim: int) -> tuple[list[int], list[float]]:
    """Rotated dimensions and bases to test: what inv_freq buffers and the config suggest first, then the rest."""
    dims, thetas = [], []
    for name, buffer in model.named_buffers():
        if "inv_freq" in name and buffer.dim() == 1 and buffer.numel() >= 2:
            dims.append(2 * buffer.numel())
            thetas.append(float(buffer[1].double() ** (-buffer.numel())))
    fraction = config_value(model.config, FRACTION_KEYS)
    if isinstance(fraction, (int, float)):
        dims.append(round(float(fraction) * head_dim))
    if isinstance(getattr(model.config, "rotary_dim", None), int):
        dims.append(model.config.rotary_dim)
    dims += [head_dim, *range(head_dim - 2, 0, -2)]
    theta = config_value(model.config, THETA_KEYS)
    if isinstance(theta, (int, float)):
        thetas.append(float(theta))
    thetas = [next((c for c in COMMON_THETAS if abs(t - c) <= 1e-3 * c), t) for t in thetas]
    return (list(dict.fromkeys(d for d in dims if 0 < d <= head_dim and d % 2 == 0)),
            list(dict.fromkeys([*thetas, *COMMON_THETAS])))


def rotary_fraction(rotary_dim: int, head_dim: int) -> float:
    """A partial_rotary_factor whose int(head_dim * pct) is exactly rotary_dim."""
    pct = rotary_dim / head_dim
    return pct if int(head_dim * pct) == rotary_dim else (rotary_dim + 0.5) / head_dim


def recognise_attention(model: nn.Module, block: nn.Module, layout: BlockLayout, fields: dict,
                        streams: list[torch.Tensor], activations: list[str], overrides: dict[str, object]
                        ) -> tuple[Attention, str]:
    """The attention conventions, and which of `activations` (what probing left, or the user's `--set
    hidden_act`), under which our block, run on the foreign first block's input, gives the foreign block's
    output. Bases come from buffers, the config and common values; if none fits, the base of the closest
    candidate is fitted by a search over log(theta). The user's `--set num_attention_heads / rope_theta /
    partial_rotary_factor` replace the search for that fact."""
    width = fields["hidden_size"]
    configured = overrides.get("num_attention_heads", config_value(model.config, HEAD_KEYS))
    heads_options = list(dict.fromkeys([*([int(configured)] if isinstance(configured, int) else []),
                                        *(h for h in range(1, width + 1) if width % h == 0 and width // h % 2 == 0)]))
    if "num_attention_heads" in overrides:
        heads_options = heads_options[:1]
    x, target = streams[0], streams[1]
    positions = torch.arange(x.shape[1]).unsqueeze(0)

    def block_error(layer: FMBCDecoderLayer, heads: int, dim: int, theta: float) -> float:
        rope = FMBCConfig(**{**fields, "num_attention_heads": heads, "rope_theta": theta,
                             "partial_rotary_factor": rotary_fraction(dim, width // heads),
                             "input_mode": "learned"})
        with torch.no_grad():
            hidden, residual = layer(torch.zeros_like(x), x, FMBCRotaryEmbedding(rope)(positions), None, None)
        return float((hidden + residual - target).abs().max()) / max(1.0, float(target.abs().max()))

    def loaded_layer(attention: Attention, act: str) -> FMBCDecoderLayer:
        config = FMBCConfig(**{**fields, "num_attention_heads": attention.heads, "hidden_act": act,
                               "num_hidden_layers": 1, "input_mode": "learned"})
        layer = FMBCDecoderLayer(config, layer_idx=1).eval()  # an index > 0 normalises its own input
        expected = {k.removeprefix("model.layers.0."): shape for k, shape in canonical_tensors(config).items()
                    if k.startswith("model.layers.0.")}
        converted = convert_block(block, layout, attention, width, "")
        layer.load_state_dict(complete({k.removeprefix("."): v for k, v in converted.items()}, expected))
        return layer

    best: tuple[float, Attention | None, str] = (math.inf, None, "")
    for heads in heads_options:  # the configured count first: usually it is the only one tried
        best_here: tuple[float, Attention | None, str] = (math.inf, None, "")
        dims, thetas = rotary_candidates(model, width // heads)
        if "partial_rotary_factor" in overrides:
            dims = [int(width // heads * float(overrides["partial_rotary_factor"]))]
        if "rope_theta" in overrides:
            thetas = [float(overrides["rope_theta"])]
        for act, order, rotary, dim in itertools.product(activations, ("qkv", "per_head") if len(layout.qkv) == 1
                                                         else (None,), ("rotate_half", "interleaved"), dims):
            layer = loaded_layer(Attention(heads, order, rotary, dim, 0.0), act)
            for theta in thetas:
                error = block_error(layer, heads, dim, theta)
                if error < best_here[0]:
                    best_here = (error, Attention(heads, order, rotary, dim, theta), act)
                if error <= FP32_MODULE_MATCH:
                    return best_here[1], act
        closest, act = best_here[1], best_here[2]
        if "rope_theta" in overrides:  # the user's base is the only one tried
            best = min(best, best_here, key=lambda candidate: candidate[0])
            continue
        layer = loaded_layer(closest, act)
        rotated = closest.rotary_dim
        theta = fit_theta(lambda t, layer=layer, heads=heads, rotated=rotated: block_error(layer, heads, rotated, t))
        if block_error(layer, heads, rotated, theta) <= FP32_MODULE_MATCH:
            return dataclasses.replace(closest, theta=theta), act
        best = min(best, best_here, key=lambda candidate: candidate[0])
    raise ImportRefused(f"the first block matches no supported convention (pre-norm rotary attention and a GELU "
                        f"MLP, {fields['block_style']}); closest: {best[1]} with {best[2]}, relative error "
                        f"{best[0]:.1e}. Learned absolute positions or other attention scalings are not of this "
                        "family; if you know the head count, rotary base or rotated fraction, pass --set "
                        "num_attention_heads=H, --set rope_theta=T or --set partial_rotary_factor=P")


def fit_theta(error: Callable[[float], float]) -> float:
    """The rotary base in [10, 1e8] minimising `error`: a log grid, then golden-section refinement, then the
    shortest decimal that still fits."""
    grid = [10 ** (1 + 7 * i / 70) for i in range(71)]
    errors = [error(t) for t in grid]
    i = min(range(len(grid)), key=errors.__getitem__)
    lo, hi = math.log(grid[max(0, i - 1)]), math.log(grid[min(len(grid) - 1, i + 1)])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if error(math.exp(a)) < error(math.exp(b)):
            hi = b
        else:
            lo = a
    theta = math.exp((lo + hi) / 2)
    for digits in range(1, 8):  # the shortest decimal that fits to the same tolerance
        rounded = float(f"{theta:.{digits}g}")
        if error(rounded) <= FP32_MODULE_MATCH:
            return rounded
    return theta
