"""The checkpoint's weight schema and the one policy by which both engines and `fmbc inspect` read it.

`canonical_tensors(config)` lists every tensor an FMBC checkpoint holds, by its canonical (Hugging Face) name,
with its shape, computed from the config alone: no model is built, no tokenizer or writer imported.

The policy, for every tensor a checkpoint holds (`tensor_problem`):
- a canonical tensor must have its schema shape and a floating-point dtype of at least 16 bits: an integer or
  fp8 tensor is a quantized weight, meaningless without its layer's scales and a `quantization_config`;
- any other tensor of a canonical layer (scales, zero points, packed weights) is a quantization tensor: it needs
  a `quantization_config`, and is read by the layer's quantization method, never copied into a float weight;
- anything else is an unexpected tensor.
Every canonical tensor must be present. `load_canonical_weights` (the engines' `load_weights`) applies it while
streaming: tensors of the layers this pipeline stage holds are loaded (q/k/v fused into `qkv_proj` in the
engines' own (param, shard, id) order; the layers the engine's quantization method quantized take their
tensors into the parameters that method made, and every such parameter must be filled); tensors of other
stages are checked only. Every problem is collected and raised as one `CheckpointError` naming each tensor,
before the engine serves, with the same words in both engines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .configuration_fmbc import FMBCConfig

# (fused parameter, checkpoint shard, shard id), the order of vLLM's and SGLang's llama.py stacked_params_mapping.
STACKED_PARAMS = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"))
# safetensors header dtypes (what `fmbc inspect` reads without loading a tensor) as torch dtypes.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: the message names every offending tensor."""


@dataclass(frozen=True)
class PipelineStage:
    """What one engine rank holds: every module except those its engine replaced by a placeholder because another
    pipeline stage holds them (or, in vLLM's pooling runner, because no head is needed). Tensors of the others
    are checked, not loaded."""

    placeholder_modules: frozenset[str] = frozenset()  # e.g. {"model.layers.1", "model.norm", "lm_head"}

    @classmethod
    def of(cls, model: nn.Module, placeholders: tuple[type, ...]) -> PipelineStage:
        """The stage of an engine model whose missing modules are instances of `placeholders` (the engine's
        PPMissingLayer, ...)."""
        return cls(frozenset(name for name, module in model.named_modules() if isinstance(module, placeholders)))

    def holds(self, name: str) -> bool:
        """Whether this stage holds the canonical (or quantization) tensor `name`."""
        return not any(name.startswith(module + ".") for module in self.placeholder_modules)


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
        if config.block_style != "parallel_shared_norm":
            tensors.update(norm(f"{layer}.post_attention_layernorm"))
        tensors.update(linear(f"{layer}.mlp.up_proj", inner, d, config.mlp_bias))
        tensors.update(linear(f"{layer}.mlp.down_proj", d, inner, config.mlp_bias))
    tensors.update(norm("model.norm"))
    tensors.update(linear("lm_head", config.vocab_size, d, config.lm_head_bias))
    return tensors


def layer_of(name: str) -> str:
    """The module a tensor belongs to (`model.layers.0.mlp.up_proj` for `...up_proj.weight_scale`)."""
    return name.rpartition(".")[0]


def quantization_configured(config: FMBCConfig) -> bool:
    return getattr(config, "quantization_config", None) is not None


def tensor_problem(name: str, shape: tuple[int, ...], dtype: torch.dtype, expected: dict[str, tuple[int, ...]],
                   quantized: bool) -> str | None:
    """The policy for one tensor outside the layers a quantization method reads; None when it is acceptable.
    `quantized` says whether the checkpoint's config has a `quantization_config`."""
    if name in expected:
        if tuple(shape) != expected[name]:
            return f"tensor {name} has shape {list(shape)}, expected {list(expected[name])}"
        if not dtype.is_floating_point or dtype.itemsize < 2:
            return (f"tensor {name} is {str(dtype).removeprefix('torch.')}, not a floating-point weight: a quantized "
                    "weight needs its layer's scales and a quantization_config in config.json")
        return None
    if layer_of(name) in {layer_of(canonical) for canonical in expected}:
        if not quantized:
            return (f"tensor {name} (shape {list(shape)}) is a quantization tensor of {layer_of(name)}, but "
                    "config.json has no quantization_config to say how to read it")
        return f"unexpected tensor {name} (shape {list(shape)}): the quantization method leaves {layer_of(name)} " \
               "unquantized"
    return f"unexpected tensor {name} (shape {list(shape)})"


def missing_tensors(expected: dict[str, tuple[int, ...]], found: Iterable[str], skip: Callable[[str], bool]
                    ) -> list[str]:
    """A message for every expected tensor absent from `found`, except those `skip` leaves to a quantization
    method (a packed weight may replace `weight`)."""
    found = set(found)
    return [f"missing tensor {name} (expected shape {list(shape)})"
            for name, shape in expected.items() if name not in found and not skip(name)]


def raise_problems(problems: list[str]) -> None:
    if problems:
        raise CheckpointError(f"FMBC checkpoint does not match its config ({len(problems)} problem(s)): "
                              + "; ".join(problems))


def engine_name(name: str) -> tuple[str, str | None]:
    """(engine parameter, shard id) of a checkpoint tensor: q/k/v become shards of the fused `qkv_proj`."""
    for fused, part, shard_id in STACKED_PARAMS:
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard_id
    return name, None


def checkpoint_name(param: str, shard: str | None) -> str:
    """The checkpoint tensor that fills `param` (or its q/k/v `shard`)."""
    for fused, part, shard_id in STACKED_PARAMS:
        if shard == shard_id:
            return param.replace(f".{fused}.", f".{part}.")
    return param


def quantized_layers(params: dict[str, nn.Parameter], expected: dict[str, tuple[int, ...]]) -> dict[str, list[str]]:
    """Engine layer -> its parameter names, for every canonical layer whose quantization method made parameters
    other than weight/bias (scales, zero points, packed weights). Other quantization parameters (the attention's
    optional KV-cache scales) keep the engine's defaults, as the engines' own loaders leave them."""
    known = {layer_of(engine_name(name)[0]) for name in expected}
    layers: dict[str, list[str]] = {}
    for name in params:
        if (layer := layer_of(name)) in known:
            layers.setdefault(layer, []).append(name)
    return {layer: names for layer, names in layers.items()
            if any(name.rpartition(".")[2] not in ("weight", "bias") for name in names)}


def load_canonical_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    config: FMBCConfig,
    default_loader: Callable[[nn.Parameter, torch.Tensor], None],
    stage: PipelineStage,
) -> set[str]:
    """Stream a checkpoint into an engine model by the policy above; return the names of the parameters loaded.

    `stage` is the part of the model this engine rank holds. Each acceptable tensor goes to its parameter's
    `weight_loader` (q/k/v as shards of `qkv_proj`), or `default_loader`. A bad tensor is skipped and reported
    with every other problem in one CheckpointError, before the engine runs."""
    expected = canonical_tensors(config)
    params = dict(model.named_parameters())
    quantized = quantized_layers(params, expected)
    configured = quantization_configured(config)
    not_held: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}  # name -> (shape, dtype), judged once all are seen
    found: set[str] = set()
    loaded: set[str] = set()
    filled: set[tuple[str, str | None]] = set()
    problems: list[str] = []
    for name, tensor in weights:
        found.add(name)
        target, shard = engine_name(name)
        if not stage.holds(name):
            not_held[name] = (tuple(tensor.shape), tensor.dtype)
            continue
        if layer_of(target) in quantized:  # the quantization method's parameters check their own tensors
            if target not in params:
                problems.append(f"unexpected tensor {name} (shape {list(tensor.shape)}): quantized layer "
                                f"{layer_of(target)} has no parameter {target.rpartition('.')[2]}")
                continue
            try:
                _load(params[target], tensor, shard, default_loader)
            except (AssertionError, RuntimeError, ValueError) as err:
                problems.append(f"tensor {name} has shape {list(tensor.shape)}, which does not fit parameter "
                                f"{target} of shape {list(params[target].shape)} ({err or type(err).__name__})")
                continue
            filled.add((target, shard))
        elif problem := tensor_problem(name, tuple(tensor.shape), tensor.dtype, expected, configured):
            problems.append(problem)
            continue
        else:
            _load(params[target], tensor, shard, default_loader)
        loaded.add(target)
    for layer, names in quantized.items():
        shards = [shard for _, _, shard in STACKED_PARAMS] if layer.endswith(".qkv_proj") else [None]
        problems += [f"missing tensor {checkpoint_name(name, shard)} (quantized parameter {name})"
                     for name in names for shard in shards if (name, shard) not in filled]
    # Another stage's layers that hold quantization tensors are that stage's quantization method's to check.
    layers = {layer_of(name) for name in expected}
    quantized_not_held = ({layer_of(name) for name in not_held if name not in expected} & layers if configured
                          else set())
    problems += [problem for name, (shape, dtype) in not_held.items() if layer_of(name) not in quantized_not_held
                 and (problem := tensor_problem(name, shape, dtype, expected, configured))]
    problems += missing_tensors(expected, found, lambda name: layer_of(engine_name(name)[0]) in quantized
                                or layer_of(name) in quantized_not_held)
    raise_problems(problems)
    return loaded


def _load(param: nn.Parameter, tensor: torch.Tensor, shard: str | None, default_loader: Callable) -> None:
    loader = getattr(param, "weight_loader", default_loader)
    loader(param, tensor) if shard is None else loader(param, tensor, shard)
