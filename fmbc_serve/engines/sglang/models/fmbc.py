"""FMBC for SGLang: the reference decoder (fmbc_serve.modeling_fmbc) on SGLang's serving layers.

In the style of SGLang's gpt_j.py / llama.py: tensor-parallel linears with fused q/k/v, RadixAttention over the
paged KV cache, ParallelLMHead and LogitsProcessor, layers passing `(hidden_states, residual)`, and pipeline
parallelism as SGLang's orion.py / llama.py have it (`make_pp_layers`, `PPMissingLayer`, the pair sent between
stages as `PPProxyTensors`). Token ids enter through the reference's `input_stage` (fixed code, no V×d table, or a
VocabParallelEmbedding in `learned` mode; fused with layer 0's norm where the Triton kernel runs).

Norms are torch's (the reference's `make_norm`), not SGLang's RMSNorm/LayerNorm: on a CPU with AMX those dispatch
to `torch.ops.sgl_kernel.*_cpu` (layers/layernorm.py `forward_cpu`), SGLang's CPU kernel library, which its
PyPI wheels do not carry, so the first request would fail there. Ids are validated per request by
`fmbc_serve.engines.sglang.validation`, so the hot path does no range check (it would force a device sync every
step). Weights load by the shared policy in `fmbc_serve.weights`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from sglang.srt.layers.activation import get_act_fn
from sglang.srt.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.pooler import Pooler, PoolingType
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.layers.utils import PPMissingLayer
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, PPProxyTensors
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils import add_prefix, make_pp_layers
from torch import nn

from fmbc_serve.configuration_fmbc import FMBCConfig
from fmbc_serve.engines.mlp import FMBCMLP
from fmbc_serve.modeling_fmbc import (  # plain torch norms and RoPE maths, exactly as the reference has them
    add_norm,
    apply_rotary,
    embed_input,
    make_input_module,
    make_norm,
    rotary_cos_sin,
    rotary_inv_freq,
    stage_input,
)
from fmbc_serve.weights import PipelineStage, load_canonical_weights

logger = logging.getLogger(__name__)

class NeoxRotaryFallback(nn.Module):
    """The reference's RoPE with SGLang's rotary call signature, on q/k of shape [T, heads * head_dim]. Used
    only where SGLang's own rotary embedding cannot be built (CPU without its kernel library)."""

    def __init__(self, config: FMBCConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.register_buffer("inv_freq", rotary_inv_freq(config), persistent=False)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = (t.unsqueeze(1) for t in rotary_cos_sin(positions, self.inv_freq))  # [T, 1, rotary_dim]
        return tuple(apply_rotary(x.view(x.shape[0], -1, self.head_dim), cos, sin).view(x.shape)
                     for x in (query, key))


def make_rotary(config: FMBCConfig) -> nn.Module:
    """SGLang's get_rope (NeoX style, partial rotation) where it can be built; otherwise the torch fallback.

    Detected by trying: on CPU without SGLang's CPU kernel library, RotaryEmbedding's constructor imports
    `vllm._custom_ops`, which is absent."""
    try:
        return get_rope(
            config.head_dim,
            rotary_dim=config.rotary_dim,
            max_position=config.max_position_embeddings,
            base=config.rope_theta,
            is_neox_style=True,
        )
    except ImportError as err:
        logger.info("SGLang rotary embedding unavailable here (%s); using the plain-torch NeoX fallback", err)
        return NeoxRotaryFallback(config)


class LogitsProcessorWithBias(LogitsProcessor):
    """SGLang's LogitsProcessor never adds `lm_head.bias` (its callers pass no embedding bias, so its own gpt_j.py
    drops GPT-J's head bias): this one adds each rank's share of the bias to that rank's share of the logits."""

    def _compute_lm_head(self, hidden_states: torch.Tensor, lm_head: nn.Module, *args, **kwargs) -> torch.Tensor:
        logits = super()._compute_lm_head(hidden_states, lm_head, *args, **kwargs)
        return logits + lm_head.bias.to(logits.dtype)


class FMBCAttention(nn.Module):
    def __init__(
        self, config: FMBCConfig, layer_id: int, quant_config: QuantizationConfig | None = None, prefix: str = ""
    ) -> None:
        super().__init__()
        tp_size = get_parallel().tp_size
        total_heads = config.num_attention_heads
        if total_heads % tp_size:
            raise ValueError(f"num_attention_heads ({total_heads}) must be divisible by the TP size ({tp_size})")
        self.num_heads = total_heads // tp_size
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, total_heads, bias=config.attention_bias,
            quant_config=quant_config, prefix=add_prefix("qkv_proj", prefix),
        )
        self.o_proj = RowParallelLinear(
            config.hidden_size, config.hidden_size, bias=config.attention_bias,
            quant_config=quant_config, prefix=add_prefix("o_proj", prefix),
        )
        self.rotary_emb = make_rotary(config)
        self.attn = RadixAttention(
            self.num_heads, self.head_dim, scaling=self.head_dim**-0.5, num_kv_heads=self.num_heads,
            layer_id=layer_id, quant_config=quant_config, prefix=add_prefix("attn", prefix),
        )

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, forward_batch: ForwardBatch
    ) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size] * 3, dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v, forward_batch))
        return out


class FMBCDecoderLayer(nn.Module):
    """Pre-norm block on the `(hidden_states, residual)` pair, as SGLang's llama.py passes it."""

    def __init__(
        self, config: FMBCConfig, layer_id: int, quant_config: QuantizationConfig | None = None, prefix: str = ""
    ) -> None:
        super().__init__()
        self.layer_idx = layer_id
        self.block_style = config.block_style
        self.input_layernorm = make_norm(config)
        self.self_attn = FMBCAttention(config, layer_id, quant_config, prefix=add_prefix("self_attn", prefix))
        if config.block_style != "parallel_shared_norm":
            self.post_attention_layernorm = make_norm(config)
        self.mlp = FMBCMLP(config, ColumnParallelLinear, RowParallelLinear, get_act_fn, quant_config,
                           prefix=add_prefix("mlp", prefix))

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor, forward_batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Layer 0 gets its normalised input from the input stage (fused with the code where the kernel runs).
        if self.layer_idx > 0:
            hidden_states, residual = add_norm(self.input_layernorm, hidden_states, residual)
        attn_output = self.self_attn(positions, hidden_states, forward_batch)
        if self.block_style == "sequential":
            hidden_states, residual = add_norm(self.post_attention_layernorm, attn_output, residual)
            return self.mlp(hidden_states), residual
        # Parallel: x + attn(ln1(x)) + mlp(ln2(x)), or one shared norm (GPT-J); the next layer adds both to x.
        mlp_input = hidden_states if self.block_style == "parallel_shared_norm" else self.post_attention_layernorm(
            residual)
        return attn_output + self.mlp(mlp_input), residual


class FMBCModel(nn.Module):
    def __init__(self, config: FMBCConfig, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        self.pp_group = get_parallel().pp_group
        if self.pp_group.is_first_rank:
            self.embed_tokens = make_input_module(
                config, lambda vocab, width: VocabParallelEmbedding(vocab, width, prefix=add_prefix("embed_tokens",
                                                                                                    prefix)))
        else:
            self.embed_tokens = PPMissingLayer()
        self.dtype = torch.get_default_dtype()  # SGLang builds the model under the serving dtype
        self.layers, self.start_layer, self.end_layer = make_pp_layers(
            config.num_hidden_layers,
            lambda idx, prefix: FMBCDecoderLayer(config, idx, quant_config, prefix=prefix),
            prefix=add_prefix("layers", prefix),
        )
        self.norm = make_norm(config) if self.pp_group.is_last_rank else PPMissingLayer()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch,
                input_embeds: torch.Tensor | None = None,
                pp_proxy_tensors: PPProxyTensors | None = None) -> torch.Tensor | PPProxyTensors:
        hidden_states, residual = stage_input(self.embed_tokens, self.layers[self.start_layer], self.config.norm_eps,
                                              self.dtype, input_ids, input_embeds,
                                              None if self.pp_group.is_first_rank else pp_proxy_tensors)
        for i in range(self.start_layer, self.end_layer):
            hidden_states, residual = self.layers[i](positions, hidden_states, residual, forward_batch)
        if not self.pp_group.is_last_rank:
            return PPProxyTensors({"hidden_states": hidden_states, "residual": residual})
        return add_norm(self.norm, hidden_states, residual)[0]


class FMBCForCausalLM(nn.Module):
    """SGLang entry class; its name must equal `architectures[0]` of FMBC checkpoints."""

    def __init__(self, config: FMBCConfig, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        self.pp_group = get_parallel().pp_group
        self.model = FMBCModel(config, quant_config, prefix=add_prefix("model", prefix))
        if self.pp_group.is_last_rank:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, bias=config.lm_head_bias,
                                          quant_config=quant_config, prefix=add_prefix("lm_head", prefix))
            self.logits_processor = (LogitsProcessorWithBias if config.lm_head_bias else LogitsProcessor)(config)
            # `--is-embedding`: the final norm's last-token state, L2-normalised, as llama.py pools.
            self.pooler = Pooler(pooling_type=PoolingType.LAST, normalize=True)
        else:
            self.lm_head = PPMissingLayer()

    @property
    def start_layer(self) -> int:
        return self.model.start_layer

    @property
    def end_layer(self) -> int:
        return self.model.end_layer

    def get_input_embeddings(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What SGLang calls to embed ids itself (token-embedding overrides, context parallelism)."""
        return lambda input_ids: embed_input(self.model.embed_tokens, input_ids, self.model.dtype)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        input_embeds: torch.Tensor | None = None,
        pp_proxy_tensors: PPProxyTensors | None = None,
        get_embedding: bool = False,
        **kwargs,
    ):
        hidden_states = self.model(input_ids, positions, forward_batch, input_embeds, pp_proxy_tensors)
        if not self.pp_group.is_last_rank:
            return hidden_states
        if get_embedding:
            return self.pooler(hidden_states, forward_batch)
        return self.logits_processor(input_ids, hidden_states, self.lm_head, forward_batch)

    def get_hidden_dim(self, module_name: str, layer_idx: int) -> tuple[int, int]:
        """(input, output) widths of a LoRA target, for SGLang's LoRA memory pool. Its default reads
        `num_key_value_heads` and assumes a gated MLP, neither of which FMBC has: SGLang's LoRA loader stacks an
        adapter's `up_proj` into a `gate_up_proj` of twice the width, so MLP adapters here may target
        `down_proj` only."""
        d, inner = self.config.hidden_size, self.config.intermediate_size
        dims = {"qkv_proj": (d, 3 * d), "o_proj": (d, d), "down_proj": (inner, d),
                "lm_head": (d, self.config.vocab_size)}
        if module_name not in dims:
            raise ValueError(f"LoRA on {module_name!r} is not supported for FMBC in SGLang (SGLang reads an "
                             "adapter's up_proj as half of a gated gate_up_proj, which FMBC does not have); "
                             "target q_proj, k_proj, v_proj, o_proj, down_proj or lm_head")
        return dims[module_name]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The shared policy; tensors of other pipeline stages are checked, not loaded."""
        return load_canonical_weights(self, weights, self.config, default_weight_loader,
                                      PipelineStage.of(self, (PPMissingLayer,)))


EntryClass = FMBCForCausalLM
