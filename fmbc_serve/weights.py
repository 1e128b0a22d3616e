"""The checkpoint's weight schema and the one policy both engines load it by.

`canonical_tensors(config)` lists every tensor an FMBC checkpoint holds, by its canonical (Hugging Face)
name, with its shape, computed from the config alone: no model is built, no tokenizer or writer imported.
`load_canonical_weights` is the engines' `load_weights`: it fuses q/k/v into `qkv_proj` in the engines' own
(param, shard, id) order, loads the tensors of quantized layers (compressed-tensors, GPTQ, AWQ: scales, zero
points, packed weights) into the parameters the engine's quantization method made, collects every missing,
unexpected and mis-shaped tensor, and raises one error that names them all.
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


def engine_name(name: str) -> tuple[str, str | None]:
    """(engine parameter, shard id) of a checkpoint tensor: q/k/v become shards of the fused `qkv_proj`."""
    for fused, part, shard_id in STACKED_PARAMS:
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard_id
    return name, None


def canonical_layers(expected: dict[str, tuple[int, ...]]) -> set[str]:
    """Engine layers (fused qkv_proj included) that hold the checkpoint's canonical tensors."""
    return {engine_name(name)[0].rpartition(".")[0] for name in expected}


def quantized_layers(params: dict[str, nn.Parameter], known: set[str]) -> dict[str, list[str]]:
    """Engine layer -> its parameter names, for every canonical layer whose quantization method made parameters
    other than weight/bias (scales, zero points, packed weights). Other quantization parameters (the attention's
    optional KV-cache scales) keep the engine's defaults, as the engines' own loaders leave them."""
    layers: dict[str, list[str]] = {}
    for name in params:
        if (layer := name.rpartition(".")[0]) in known:
            layers.setdefault(layer, []).append(name)
    return {layer: names for layer, names in layers.items()
            if any(name.rpartition(".")[2] not in ("weight", "bias") for name in names)}


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
    Layers the engine quantized (its quant_config gave them scales, zero points or packed weights) follow the
    engines' convention instead: each of their tensors goes, by name, to the parameter the quantization method
    made, whose own loader checks it, and every such parameter (each q/k/v shard) must be filled.
    A bad tensor is skipped and reported with every other problem in one ValueError, before the engine runs."""
    expected = canonical_tensors(config)
    params = dict(model.named_parameters())
    known_layers = canonical_layers(expected)
    quantized = quantized_layers(params, known_layers)
    found: dict[str, tuple[int, ...]] = {}
    quantized_elsewhere: set[str] = set()  # layers of other pipeline stages with quantized tensors
    loaded: set[str] = set()
    filled: set[tuple[str, str | None]] = set()
    problems: list[str] = []
    for name, tensor in weights:
        found[name] = tuple(tensor.shape)
        target, shard = engine_name(name)
        layer = target.rpartition(".")[0]
        if layer in quantized:
            if target not in params:
                problems.append(f"unexpected tensor {name} (shape {list(tensor.shape)}): quantized layer {layer} "
                                f"has no parameter {target.rpartition('.')[2]}")
                continue
            param = params[target]
            loader = getattr(param, "weight_loader", default_loader)
            try:
                loader(param, tensor) if shard is None else loader(param, tensor, shard)
            except (AssertionError, RuntimeError, ValueError) as err:
                problems.append(f"tensor {name} has shape {list(tensor.shape)}, which does not fit parameter "
                                f"{target} of shape {list(param.shape)} ({err or type(err).__name__})")
                continue
            loaded.add(target)
            filled.add((target, shard))
            continue
        if is_elsewhere(target):
            if name not in expected and layer in known_layers:
                quantized_elsewhere.add(layer)
            continue
        if expected.get(name) != found[name]:
            continue
        param = params[target]
        loader = getattr(param, "weight_loader", default_loader)
        loader(param, tensor) if shard is None else loader(param, tensor, shard)
        loaded.add(target)
    for layer, names in quantized.items():
        shards = [shard for _, _, shard in STACKED_PARAMS] if layer.endswith(".qkv_proj") else [None]
        problems += [f"missing tensor {checkpoint_name(name, shard)} (quantized parameter {name})"
                     for name in names for shard in shards if (name, shard) not in filled]

    def plain(name: str) -> bool:
        layer = engine_name(name)[0].rpartition(".")[0]
        return layer not in quantized and layer not in quantized_elsewhere

    problems += check_tensors({name: shape for name, shape in expected.items() if plain(name)},
                              {name: shape for name, shape in found.items() if plain(name)})
    if problems:
        raise ValueError(f"FMBC checkpoint does not match its config ({len(problems)} problem(s)): "
                         + "; ".join(problems))
    return loaded


def checkpoint_name(param: str, shard: str | None) -> str:
    """The checkpoint tensor that fills `param` (or its q/k/v `shard`)."""
    for fused, part, shard_id in STACKED_PARAMS:
        if shard == shard_id:
            return param.replace(f".{fused}.", f".{part}.")
    return param
