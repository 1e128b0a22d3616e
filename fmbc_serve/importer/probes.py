"""Norms and the MLP's activation, found by calling the foreign modules on probe inputs."""

from __future__ import annotations

import torch
from torch import nn

from ..configuration_fmbc import ACTIVATIONS
from ..tolerances import FP32_MODULE_MATCH
from .errors import ImportRefused
from .structure import Structure, bias_of, matrix, norm_shift, norm_tensors

# Norm probes of this size make eps dominate the variance, so eps can be solved for; eps values that foreign code
# uses, which an estimate within 2 % snaps to.
EPS_PROBE_SCALE = 1e-4
COMMON_EPS = (1e-5, 1e-6, 1e-8, 1e-12, 1e-7, 1e-10, 1e-9, 1e-4, 1e-3)


def probe_norm(module: nn.Module, width: int) -> tuple[str, float]:
    """(`layernorm` or `rmsnorm`, eps) of a norm module, found by calling it: eps is solved from an input
    small enough that eps dominates, then the whole formula is checked on an ordinary input."""
    scale, shift = (t.detach().float() for t in (*norm_tensors(module)[:1], norm_shift(module)))
    gen = torch.Generator().manual_seed(0)
    usable = scale.abs() > 1e-3
    results = []
    for kind in ("layernorm", "rmsnorm"):
        tiny = (torch.randn(4, width, generator=gen) + (1.0 if kind == "layernorm" else 0.0)) * EPS_PROBE_SCALE
        with torch.no_grad():
            unit = (module(tiny).float() - shift) / scale
        centred = tiny - tiny.mean(-1, keepdim=True) if kind == "layernorm" else tiny
        spread = centred.pow(2).mean(-1, keepdim=True)
        ok = usable & (unit.abs() > 1e-3)
        estimate = float(((centred / unit).pow(2) - spread)[ok.expand_as(unit)].median()) if ok.any() else COMMON_EPS[0]
        eps = snap_eps(estimate)
        x = torch.randn(3, 7, width, generator=gen) * 2 + 0.5
        with torch.no_grad():
            got = module(x).float()
        centred = x - x.mean(-1, keepdim=True) if kind == "layernorm" else x
        want = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * scale + shift
        results.append((float((got - want).abs().max()) / max(1.0, float(got.abs().max())), kind, eps))
    error, kind, eps = min(results)
    if error > FP32_MODULE_MATCH:
        raise ImportRefused(f"norm {type(module).__name__} is neither LayerNorm nor RMSNorm (closest: {kind}, "
                            f"relative error {error:.1e}); if you know it is one, pass --set norm_type=layernorm|"
                            "rmsnorm and --set norm_eps=E")
    if kind == "rmsnorm" and bool(shift.any()):
        raise ImportRefused("an RMSNorm with a non-zero bias has no FMBC form")
    return kind, eps


def shared_norm(model: nn.Module, structure: Structure) -> tuple[str, float]:
    """(kind, eps) of the model's norms, probed one by one: FMBC uses one norm throughout, so any that differs
    from the first block's attention norm is refused."""
    width = structure.width
    kind, eps = probe_norm(structure.blocks[0].get_submodule(structure.layout.attn_norm), width)
    for name, norm in structure.named_norms(model):
        if (found := probe_norm(norm, width)) != (kind, eps):
            raise ImportRefused(f"the model's norms differ: {name} is {found[0]} with eps {found[1]:g}, the first "
                                f"block's attention norm {kind} with eps {eps:g}; FMBC uses one norm throughout")
    return kind, eps


def snap_eps(estimate: float) -> float:
    """Round an estimated eps to the common value it is within 2 % of, if any."""
    for common in COMMON_EPS:
        if abs(estimate - common) <= 0.02 * common:
            return common
    return float(f"{max(estimate, 1e-12):.3g}")


def probe_activation(mlp: nn.Module, up: nn.Module, down: nn.Module, width: int) -> list[str]:
    """GELU variants that reproduce `mlp(x)`, closest first; both when the module cannot be called alone (tested
    later). The probe is scaled so that the pre-activations spread over ±4, where exact and tanh GELU differ by up
    to 5e-4: with small (freshly initialised) weights, random inputs would not tell them apart."""
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        projected = x @ matrix(up).t()
        scale = 2.0 / max(float(projected.std()), 1e-12)
        x, pre_activation = x * scale, projected * scale + bias_of(up)
    try:
        with torch.no_grad():
            got = mlp(x).float()
    except Exception:  # noqa: BLE001 (a module with its own signature: leave it to the block test)
        return list(ACTIVATIONS)
    errors = {}
    for act, (approximate, _) in ACTIVATIONS.items():
        with torch.no_grad():
            want = nn.functional.gelu(pre_activation, approximate=approximate) @ matrix(down).t() + bias_of(down)
        errors[act] = float((got - want).abs().max())
    magnitude = max(1.0, float(got.abs().max()))
    found = sorted((act for act, error in errors.items() if error <= FP32_MODULE_MATCH * magnitude), key=errors.get)
    if not found:
        raise ImportRefused(f"the MLP ({type(mlp).__name__}) is not up -> GELU (exact or tanh) -> down; if you know "
                            "which GELU it is, pass --set hidden_act=gelu|gelu_tanh")
    return found


def mlp_activations(structure: Structure) -> list[str]:
    """The GELU variants the first block's MLP may use, closest first (`probe_activation`); every one when up and
    down sit in the block itself, with no MLP module to call alone (then the block test decides)."""
    layout, get = structure.layout, structure.blocks[0].get_submodule
    mlp = layout.down.rpartition(".")[0]
    if not mlp:
        return list(ACTIVATIONS)
    return probe_activation(get(mlp), get(layout.up), get(layout.down), structure.width)
