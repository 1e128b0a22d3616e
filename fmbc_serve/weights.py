"""The checkpoint's weight schema and the one policy both engines load it by.

`canonical_tensors(config)` lists every tensor an FMBC checkpoint holds, by its canonical (Hugging Face)
name, with its shape, computed from the config alone: no model is built, no tokenizer or writer imported.
`load_canonical_weights` is the engines' `load_weights`: it fuses q/k/v into `qkv_proj` in the engines' own
(param, shard, id) order, collects every missing, unexpected and mis-shaped tensor, and raises one error that
names them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from .configuration_fmbc import FMBCConfig

# (fused parameter, checkpoint shard, shard id), the order of vLLM's and SGLang's llama.py stacked_params_mapping.
STACKED_PARAMS = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"))


def canonical_tensors(config: FMBCConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensor name -> shape for a config, in the reference model's state_dict order."""
    d, inner = config.hidden_size, config.intermediate_size
    with_bias = config.norm_type == "layernorm"

    def linear(name: str, rows: int, cols: int, bias: bool) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (rows, cols), **({f"{name}.bias": (rows,)} if bias else {})}

    def norm(name: str) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (d,), **({f"{name}.bias": (d,)} if with_bias else {})}

    tensors: dict[str, tuple[int, ...]] = {}
    if config.input_mode == "learned":
        tensors["model.embed_tokens.weight"] = (config.vocab_size, d)
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}"
        tensors.update(norm(f"{layer}.input_layernorm"))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors.update(linear(f"{layer}.self_attn.{proj}", d, d, config.attention_bias))
        tensors.update(norm(f"{layer}.post_attention_layernorm"))
        tensors.update(linear(f"{layer}.mlp.up_proj", inner, d, config.mlp_bias))
        tensors.update(linear(f"{layer}.mlp.down_proj", d, inner, config.mlp_bias))
    tensors.update(norm("model.norm"))
    tensors["lm_head.weight"] = (config.vocab_size, d)
    return tensors


def check_tensors(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> list[str]:
    """Missing, unexpected and mis-shaped tensors, each as a message that names the tensor."""
    problems = [f"missing tensor {name} (expected shape {list(shape)})"
                for name, shape in expected.items() if name not in found]
    problems += [f"unexpected tensor {name} (shape {list(found[name])})" for name in found if name not in expected]
    problems += [f"tensor {name} has shape {list(found[name])}, expected {list(shape)}"
                 for name, shape in expected.items() if name in found and tuple(found[name]) != shape]
    return problems


def load_canonical_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    config: FMBCConfig,
    default_loader: Callable[[nn.Parameter, torch.Tensor], None],
    is_elsewhere: Callable[[str], bool] = lambda name: False,
) -> set[str]:
    """Stream canonical tensors into an engine model; return the names of the parameters loaded.

    Each tensor goes to its parameter's `weight_loader` (q/k/v as shards of `qkv_proj`), or `default_loader`.
    `is_elsewhere(param)` is true for parameters another pipeline stage holds (they are checked, not loaded).
    A bad tensor is skipped and reported with every other problem in one ValueError, before the engine runs."""
    expected = canonical_tensors(config)
    params = dict(model.named_parameters())
    found: dict[str, tuple[int, ...]] = {}
    loaded: set[str] = set()
    for name, tensor in weights:
        found[name] = tuple(tensor.shape)
        if expected.get(name) != found[name]:
            continue
        target, shard = name, None
        for fused, part, shard_id in STACKED_PARAMS:
            if f".{part}." in name:
                target, shard = name.replace(part, fused), shard_id
                break
        if is_elsewhere(target):
            continue
        param = params[target]
        loader = getattr(param, "weight_loader", default_loader)
        loader(param, tensor) if shard is None else loader(param, tensor, shard)
        loaded.add(target)
    problems = check_tensors(expected, found)
    if problems:
        raise ValueError(f"FMBC checkpoint does not match its config ({len(problems)} problem(s)): "
                         + "; ".join(problems))
    return loaded
