"""FMBC for SGLang: the reference decoder (fmbc_serve.modeling_fmbc) on SGLang's serving layers.

In the style of SGLang's gpt_j.py / llama.py: tensor-parallel linears with fused q/k/v, RadixAttention over the
paged KV cache, ParallelLMHead and LogitsProcessor. The input is the token id's fixed binary code
(`FixedCodeInput(config.binary_code())`, the same maths as `BinaryCode.embed`, no V×d table) or, in `learned`
mode, a VocabParallelEmbedding. Token ids are
validated at request level by fmbc_serve.sglang_plugin, so the hot path does no range check (it would force a
device sync every step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from sglang.srt.layers.activation import get_act_fn
from sglang.srt.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from sglang.srt.layers.logits_processor import LogitsProcessor
from sglang.srt.layers.quantization.base_config import QuantizationConfig
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from sglang.srt.model_executor.forward_batch_info import ForwardBatch
from sglang.srt.model_loader.weight_utils import default_weight_loader
from sglang.srt.runtime_context import get_parallel
from sglang.srt.utils import add_prefix
from torch import nn

from fmbc_serve.binary_code import FixedCodeInput
from fmbc_serve.checkpoint import check_tensors, expected_tensors
from fmbc_serve.configuration_fmbc import FMBCConfig
from fmbc_serve.kernel_dispatch import fused_input_norm
from fmbc_serve.modeling_fmbc import make_norm  # plain torch norms, exactly as the reference builds them

logger = logging.getLogger(__name__)

# SGLang's activation names for FMBCConfig.hidden_act.
_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# Canonical (checkpoint) projection name -> (fused parameter name, shard id).
_STACKED = (("q_proj", "qkv_proj", "q"), ("k_proj", "qkv_proj", "k"), ("v_proj", "qkv_proj", "v"))


class NeoxRotaryFallback(nn.Module):
    """Plain-torch NeoX RoPE on the first `rotary_dim` channels of each head, with SGLang's rotary call
    signature. Used only where SGLang's own rotary embedding cannot be built (CPU without its kernel library);
    it computes the angles as the reference model does, in float32."""

    def __init__(self, head_dim: int, rotary_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(shape[0], -1, self.head_dim)
        x_rot, x_pass = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        x1, x2 = x_rot.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1).view(shape)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [T, 1, rotary_dim]
        cos, sin = angles.cos().to(query.dtype), angles.sin().to(query.dtype)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)


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
        return NeoxRotaryFallback(config.head_dim, config.rotary_dim, config.rope_theta)


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


class FMBCMLP(nn.Module):
    def __init__(self, config: FMBCConfig, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.up_proj = ColumnParallelLinear(
            config.hidden_size, config.intermediate_size, bias=config.mlp_bias,
            quant_config=quant_config, prefix=add_prefix("up_proj", prefix),
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias,
            quant_config=quant_config, prefix=add_prefix("down_proj", prefix),
        )
        self.act = get_act_fn(_ACTIVATIONS[config.hidden_act])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.up_proj(x)
        x, _ = self.down_proj(self.act(x))
        return x


class FMBCDecoderLayer(nn.Module):
    """Pre-norm block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def __init__(
        self, config: FMBCConfig, layer_id: int, quant_config: QuantizationConfig | None = None, prefix: str = ""
    ) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = FMBCAttention(config, layer_id, quant_config, prefix=add_prefix("self_attn", prefix))
        self.post_attention_layernorm = make_norm(config)
        self.mlp = FMBCMLP(config, quant_config, prefix=add_prefix("mlp", prefix))

    def forward(
        self,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
        forward_batch: ForwardBatch,
        normed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`normed` is input_layernorm(hidden_states) when the caller already has it (the fused first layer)."""
        if normed is None:
            normed = self.input_layernorm(hidden_states)
        hidden_states = hidden_states + self.self_attn(positions, normed, forward_batch)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class FMBCModel(nn.Module):
    def __init__(self, config: FMBCConfig, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        if config.input_mode == "learned":
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, prefix=add_prefix("embed_tokens", prefix)
            )
        else:
            self.embed_tokens = FixedCodeInput(config.binary_code())
        self.norm_eps = config.norm_eps
        self.dtype = torch.get_default_dtype()  # SGLang builds the model under the serving dtype
        self.layers = nn.ModuleList(
            FMBCDecoderLayer(config, i, quant_config, prefix=add_prefix(f"layers.{i}", prefix))
            for i in range(config.num_hidden_layers)
        )
        self.norm = make_norm(config)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model input for `input_ids` (no range check: ids are validated per request)."""
        if isinstance(self.embed_tokens, FixedCodeInput):
            return self.embed_tokens(input_ids, self.dtype)
        return self.embed_tokens(input_ids)

    def embed_and_first_norm(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer-0 residual input, layer 0's input_layernorm of it) for `input_ids`.

        The seam for the fused input-code + first-norm kernel: in fixed modes `fused_input_norm` runs the
        Triton kernel where it is enabled (CUDA) and the two torch ops otherwise."""
        first_norm = self.layers[0].input_layernorm
        if isinstance(self.embed_tokens, FixedCodeInput):
            return fused_input_norm(self.embed_tokens, first_norm, input_ids, self.dtype, self.norm_eps)
        hidden_states = self.embed_tokens(input_ids)
        return hidden_states, first_norm(hidden_states)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_embeds is None:
            hidden_states, normed = self.embed_and_first_norm(input_ids)
        else:
            hidden_states, normed = input_embeds, None
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states, forward_batch, normed)
            normed = None
        return self.norm(hidden_states)


class FMBCForCausalLM(nn.Module):
    """SGLang entry class; its name must equal `architectures[0]` of FMBC checkpoints."""

    def __init__(self, config: FMBCConfig, quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        self.config = config
        self.quant_config = quant_config
        self.model = FMBCModel(config, quant_config, prefix=add_prefix("model", prefix))
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, quant_config=quant_config, prefix=add_prefix("lm_head", prefix)
        )
        self.logits_processor = LogitsProcessor(config)

    def get_input_embeddings(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """What SGLang calls to embed ids itself (token-embedding overrides, context parallelism)."""
        return self.model.embed_input_ids

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        forward_batch: ForwardBatch,
        input_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        hidden_states = self.model(input_ids, positions, forward_batch, input_embeds)
        return self.logits_processor(input_ids, hidden_states, self.lm_head, forward_batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load canonical checkpoint tensors (q/k/v_proj fused into qkv_proj).

        Raises ValueError naming every missing, unexpected or mis-shaped tensor; nothing is half-loaded
        silently. Returns the names of the loaded parameters."""
        expected = expected_tensors(self.config)
        params = dict(self.named_parameters())
        found: dict[str, tuple[int, ...]] = {}
        loaded: set[str] = set()
        for name, tensor in weights:
            found[name] = tuple(tensor.shape)
            if expected.get(name) != found[name]:
                continue  # reported below with every other problem
            for shard_name, fused_name, shard_id in _STACKED:
                if f".{shard_name}." in name:
                    target = name.replace(shard_name, fused_name)
                    params[target].weight_loader(params[target], tensor, shard_id)
                    break
            else:
                target = name
                weight_loader = getattr(params[target], "weight_loader", default_weight_loader)
                weight_loader(params[target], tensor)
            loaded.add(target)
        problems = check_tensors(expected, found)
        if problems:
            raise ValueError(f"FMBC checkpoint does not match its config ({len(problems)} problem(s)): "
                             + "; ".join(problems))
        return loaded


EntryClass = FMBCForCausalLM
