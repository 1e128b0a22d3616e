"""Inference-only FMBC model for vLLM (written like vLLM's own gpt_j.py / llama.py).

Token ids enter through the reference's `input_stage` (fixed code or learned table, fused with layer 0's
norm where the Triton kernel runs): with a fixed code no V×d table exists, and under tensor parallelism every
rank computes the full input locally, with no all-reduce (a learned table is vocab-sharded and needs one).
Layers pass `(hidden_states, residual)` as llama.py does, with vLLM's fused residual-add + RMSNorm where the
checkpoint's norm is an RMSNorm; pipeline parallelism follows llama.py too (`make_layers`, `PPMissingLayer`,
intermediate tensors). Weights load by the shared policy in `fmbc_serve.weights`.

Registered with vLLM by `fmbc_serve.engines.vllm.plugin` (entry point `vllm.general_plugins`). No
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
from vllm.model_executor.models.interfaces import SupportsLoRA, SupportsPP, SupportsQuant
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    StageMissingLayer,
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.sequence import IntermediateTensors

from fmbc_serve.configuration_fmbc import FMBCConfig
from fmbc_serve.engines.mlp import FMBCMLP
from fmbc_serve.modeling_fmbc import embed_input, make_input_module, make_norm, stage_input
from fmbc_serve.weights import PipelineStage, load_canonical_weights


def add_then_norm(norm: nn.Module, hidden_states: torch.Tensor,
                  residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + hidden_states), residual + hidden_states): one fused op with vLLM's RMSNorm
    (`norm(x, residual)`, as llama.py calls it); vLLM's LayerNorm has no fused form, so there the add comes first."""
    if isinstance(norm, RMSNorm):
        return norm(hidden_states, residual)
    residual = residual + hidden_states
    return norm(residual), residual


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
                             "partial_rotary_factor": config.partial_rotary_factor},
        )
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5, cache_config=cache_config,
                              quant_config=quant_config, prefix=f"{prefix}.attn")
        backend = self.attn.attn_backend
        if not backend.supports_head_size(self.head_dim):  # else the first request kills the engine (CPU backend)
            raise ValueError(f"vLLM's {backend.get_name()} attention supports head sizes "
                             f"{backend.get_supported_head_sizes()}; this checkpoint has head_dim {self.head_dim} "
                             f"(hidden_size {config.hidden_size} / {total_heads} heads)")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.q_size, self.q_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class FMBCDecoderLayer(nn.Module):
    def __init__(self, config: FMBCConfig, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
                 prefix: str) -> None:
        super().__init__()
        self.layer_idx = extract_layer_index(prefix)
        self.block_style = config.block_style
        self.input_layernorm = make_norm(config, LayerNorm, RMSNorm)
        self.self_attn = FMBCAttention(config, cache_config, quant_config, prefix=f"{prefix}.self_attn")
        if config.block_style != "parallel_shared_norm":
            self.post_attention_layernorm = make_norm(config, LayerNorm, RMSNorm)
        self.mlp = FMBCMLP(config, ColumnParallelLinear, RowParallelLinear, get_act_fn, quant_config,
                           prefix=f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Layer 0 gets its normalised input from the input stage (fused with the code where the kernel runs).
        if self.layer_idx > 0:
            hidden_states, residual = add_then_norm(self.input_layernorm, hidden_states, residual)
        attn_output = self.self_attn(positions, hidden_states)
        if self.block_style == "sequential":
            hidden_states, residual = add_then_norm(self.post_attention_layernorm, attn_output, residual)
            return self.mlp(hidden_states), residual
        # Parallel: x + attn(ln1(x)) + mlp(ln2(x)), or one shared norm (GPT-J); the next layer adds both to x.
        mlp_input = hidden_states if self.block_style == "parallel_shared_norm" else self.post_attention_layernorm(
            residual)
        return attn_output + self.mlp(mlp_input), residual


@support_torch_compile
class FMBCModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: FMBCConfig = vllm_config.model_config.hf_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.config = config
        self.dtype = vllm_config.model_config.dtype
        pp_group = get_pp_group()
        if pp_group.is_first_rank:
            self.embed_tokens = make_input_module(
                config, lambda vocab, width: VocabParallelEmbedding(vocab, width, prefix=f"{prefix}.embed_tokens"))
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: FMBCDecoderLayer(config, cache_config, quant_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = make_norm(config, LayerNorm, RMSNorm) if pp_group.is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The residual stream's start for `input_ids` (what vLLM asks for when it embeds ids itself)."""
        return embed_input(self.embed_tokens, input_ids, self.dtype)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor | IntermediateTensors:
        hidden_states, residual = stage_input(self.embed_tokens, self.layers[self.start_layer], self.config.norm_eps,
                                              self.dtype, input_ids, inputs_embeds,
                                              None if get_pp_group().is_first_rank else intermediate_tensors)
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        return add_then_norm(self.norm, hidden_states, residual)[0]


class FMBCForCausalLM(nn.Module, SupportsLoRA, SupportsPP, SupportsQuant):
    # LoRA (and quantization configs) address q/k/v by their checkpoint names inside the fused qkv_proj.
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    # As in llama.py; a fixed-code input has no table, so there `embed_tokens` takes no adapter.
    embedding_modules = {"embed_tokens": "input_embeddings", "lm_head": "output_embeddings"}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config: FMBCConfig = vllm_config.model_config.hf_config
        self.config = config
        self.model = FMBCModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if get_pp_group().is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=config.lm_head_bias,
                                          quant_config=vllm_config.quant_config, prefix=maybe_prefix(prefix, "lm_head"))
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
        return self.logits_processor(self.lm_head, hidden_states, self.lm_head.bias)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # Another stage's layers (and the pooling runner's dropped head) are vLLM's placeholder modules.
        stage = PipelineStage.of(self, (PPMissingLayer, StageMissingLayer))
        return load_canonical_weights(self, weights, self.config, default_weight_loader, stage)
