"""FMBC reference model for Hugging Face transformers.

A pre-norm decoder-only Transformer (rotary attention, GELU MLP, untied output head) whose input is the token
id's fixed binary code lifted to model width (no parameters), or, in `learned` mode, the paper's learned
embedding table. This is the reference every engine is checked against; it favours plain, readable PyTorch.

It imports only torch, transformers and its two siblings with relative imports, so the three files copied into
a checkpoint folder load with `trust_remote_code=True` where fmbc_serve is not installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .binary_code import FixedCodeInput
from .configuration_fmbc import FMBCConfig


def make_norm(config: FMBCConfig) -> nn.Module:
    """LayerNorm (weight and bias) or RMSNorm (weight), as the config says."""
    if config.norm_type == "layernorm":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
    return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)


class FMBCRotaryEmbedding(nn.Module):
    """NeoX-style RoPE over the first `rotary_dim` channels of each head."""

    def __init__(self, config: FMBCConfig) -> None:
        super().__init__()
        dim = config.rotary_dim
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.float().to(position_ids.device)
        angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, rotary_dim]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] channels of x [B, H, T, D]; the rest pass through."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class FMBCAttention(nn.Module):
    def __init__(self, config: FMBCConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor,
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        shape = (batch, length, self.num_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class FMBCMLP(nn.Module):
    def __init__(self, config: FMBCConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.approximate = "tanh" if config.hidden_act == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class FMBCDecoderLayer(nn.Module):
    def __init__(self, config: FMBCConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(config)
        self.self_attn = FMBCAttention(config, layer_idx)
        self.post_attention_layernorm = make_norm(config)
        self.mlp = FMBCMLP(config)

    def forward(self, hidden_states, rotary, attention_mask, past_key_values) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), rotary, attention_mask, past_key_values
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class FMBCPreTrainedModel(PreTrainedModel):
    config_class = FMBCConfig
    base_model_prefix = "model"
    _no_split_modules = ["FMBCDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, FixedCodeInput):  # buffers are rebuilt from the config after meta-device init
            for name, table in zip(("shifts", "width_bits", "affine_matrix"), module.code.tables(), strict=True):
                if table is not None:
                    getattr(module, name).copy_(table)
        elif isinstance(module, FMBCRotaryEmbedding):
            dim = self.config.rotary_dim
            module.inv_freq.copy_(1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2).float() / dim)))


class FMBCModel(FMBCPreTrainedModel):
    """The decoder stack. `embed_tokens` is the fixed code (no parameters) or, in `learned` mode, a table."""

    def __init__(self, config: FMBCConfig) -> None:
        super().__init__(config)
        if config.input_mode == "learned":
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        else:
            self.embed_tokens = FixedCodeInput(config.binary_code())
        self.layers = nn.ModuleList(FMBCDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.rotary_emb = FMBCRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The model input for `input_ids`; out-of-range ids raise instead of aliasing."""
        if isinstance(self.embed_tokens, FixedCodeInput):
            self.embed_tokens.code.check_ids(input_ids)
            return self.embed_tokens(input_ids, self.norm.weight.dtype)
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size})")
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        hidden_states = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        batch, length = hidden_states.shape[:2]
        if past_length + length > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past_length + length} tokens exceeds the context length "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = torch.arange(past_length, past_length + length, device=hidden_states.device)
                position_ids = position_ids.unsqueeze(0).expand(batch, -1)
        mask = causal_mask(length, past_length, attention_mask, hidden_states.device)
        rotary = self.rotary_emb(position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, rotary, mask, past_key_values if use_cache else None)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states), past_key_values=past_key_values if use_cache else None
        )


def causal_mask(
    length: int, past_length: int, attention_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Boolean [B|1, 1, T, past+T] mask: causal, minus padded keys, always keeping each query's own key
    (so rows of padding tokens stay finite)."""
    query_pos = torch.arange(past_length, past_length + length, device=device).unsqueeze(-1)
    key_pos = torch.arange(past_length + length, device=device).unsqueeze(0)
    allowed = (key_pos <= query_pos).unsqueeze(0)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, -(past_length + length):]
        allowed = allowed | (key_pos == query_pos).unsqueeze(0)
    return allowed.unsqueeze(1)


class FMBCForCausalLM(FMBCPreTrainedModel, GenerationMixin):
    """FMBC decoder with its untied output projection; works with `generate()` and a KV cache."""

    def __init__(self, config: FMBCConfig) -> None:
        super().__init__(config)
        self.model = FMBCModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)
