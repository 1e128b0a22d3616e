"""Inference-only FMBC model for vLLM (written like vLLM's own gpt_j.py / llama.py).

The fixed input modes compute each token's input from its id through the single source of truth
(`binary_code.FixedCodeInput`): no V×d table exists, and under tensor parallelism every rank computes the full
input locally, with no all-reduce (a learned table is vocab-sharded and needs one). Pipeline parallelism
follows llama.py: `make_layers`, `PPMissingLayer` and intermediate tensors.

Registered with vLLM by `fmbc_serve.vllm_plugin` (entry point `vllm.general_plugins`). No
`from __future__ import annotations` here: `support_torch_compile` reads the forward's real annotations to find
the dynamic dimensions.
"""

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import LayerNorm, RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import SupportsPP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from .binary_code import FixedCodeInput
from .checkpoint import check_tensors, expected_tensors
from .configuration_fmbc import FMBCConfig
from .kernel_dispatch import fused_input_norm

# Checkpoint name -> (fused parameter, shard id), as in llama.py's stacked_params_mapping.
STACKED_PARAMS = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"))


def make_norm(config: FMBCConfig) -> nn.Module:
    if config.norm_type == "layernorm":
        return LayerNorm(config.hidden_size, eps=config.norm_eps)
    return RMSNorm(config.hidden_size, eps=config.norm_eps)


class FMBCAttention(nn.Module):
    def __init__(self, config: FMBCConfig, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        total_heads = config.num_attention_heads
        tp_size = get_tensor_model_parallel_world_size()
        if total_heads % tp_size:
            raise ValueError(f"num_attention_heads ({total_heads}) must be divisible by tensor_parallel_size "
                             f"({tp_size})")
        self.num_heads = total_heads // tp_size
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, total_heads, bias=config.attention_bias,
                                          quant_config=quant_config, prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(config.hidden_size, config.hidden_size, bias=config.attention_bias,
                                        quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=config.max_position_embeddings,
            is_neox_style=True,
            rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta,
                             "partial_rotary_factor": config.rotary_pct},
        )
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.q_size, self.q_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class FMBCMLP(nn.Module):
    def __init__(self, config: FMBCConfig, quant_config: QuantizationConfig | None, prefix: str) -> None:
        super().__init__()
        self.up_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias,
                                            quant_config=quant_config, prefix=f"{prefix}.up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias,
                                           quant_config=quant_config, prefix=f"{prefix}.down_proj")
        self.act = get_act_fn("gelu_pytorch_tanh" if config.hidden_act == "gelu_tanh" else "gelu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.up_proj(x)
        x, _ = self.down_proj(self.act(x))
        return x


class FMBCDecoderLayer(nn.Module):
    def __init__(self, config: FMBCConfig, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = FMBCAttention(config, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        self.post_attention_layernorm = make_norm(config)
        self.mlp = FMBCMLP(config, quant_config, prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                normed: torch.Tensor | None = None) -> torch.Tensor:
        """`normed` is input_layernorm(hidden_states) when the caller already has it (the fused input kernel)."""
        if normed is None:
            normed = self.input_layernorm(hidden_states)
        hidden_states = hidden_states + self.self_attn(positions, normed)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


@support_torch_compile
class FMBCModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: FMBCConfig = vllm_config.model_config.hf_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.config = config
        pp_group = get_pp_group()
        if not pp_group.is_first_rank:
            self.embed_tokens = PPMissingLayer()
        elif config.input_mode == "learned":
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                       prefix=f"{prefix}.embed_tokens")
        else:
            self.embed_tokens = FixedCodeInput(config.binary_code())
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: FMBCDecoderLayer(config, cache_config, quant_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = make_norm(config) if pp_group.is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], config.hidden_size)
        self.dtype = vllm_config.model_config.dtype

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed_tokens, FixedCodeInput):
            return self.embed_tokens(input_ids, self.dtype)
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        start = self.start_layer
        if not get_pp_group().is_first_rank:
            hidden_states = intermediate_tensors["hidden_states"]
        elif inputs_embeds is not None:
            hidden_states = inputs_embeds
        elif isinstance(self.embed_tokens, FixedCodeInput):
            # Fixed code: the lift and layer 0's input norm, fused into one kernel where available.
            first = self.layers[start]
            hidden_states, normed = fused_input_norm(self.embed_tokens, first.input_layernorm, input_ids,
                                                     self.dtype, self.config.norm_eps)
            hidden_states = first(positions, hidden_states, normed)
            start += 1
        else:
            hidden_states = self.embed_tokens(input_ids)
        for layer in islice(self.layers, start, self.end_layer):
            hidden_states = layer(positions, hidden_states)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states})
        return self.norm(hidden_states)


class FMBCForCausalLM(nn.Module, SupportsPP):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: FMBCConfig = vllm_config.model_config.hf_config
        self.config = config
        self.model = FMBCModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                          prefix=maybe_prefix(prefix, "lm_head"))
            self.logits_processor = LogitsProcessor(config.vocab_size)
        else:
            self.lm_head = PPMissingLayer()
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Map canonical checkpoint tensors onto the fused, sharded layers. Every tensor is checked against the
        config as it streams in, so a missing, unexpected or mis-shaped tensor fails loading with its name."""
        expected = expected_tensors(self.config)
        params = dict(self.named_parameters())
        seen: dict[str, tuple[int, ...]] = {}
        loaded: set[str] = set()
        for name, weight in weights:
            seen[name] = tuple(weight.shape)
            problems = check_tensors({name: expected[name]} if name in expected else {}, {name: seen[name]})
            if problems:
                raise ValueError(f"FMBC checkpoint does not match its config: {problems[0]}")
            for fused, part, shard in STACKED_PARAMS:
                if f".{part}." in name:
                    name = name.replace(part, fused)
                    if not is_pp_missing_parameter(name, self):
                        params[name].weight_loader(params[name], weight, shard)
                        loaded.add(name)
                    break
            else:
                if not is_pp_missing_parameter(name, self):
                    param = params[name]
                    getattr(param, "weight_loader", default_weight_loader)(param, weight)
                    loaded.add(name)
        missing = check_tensors(expected, seen)
        if missing:
            raise ValueError("FMBC checkpoint does not match its config: " + "; ".join(missing))
        return loaded
