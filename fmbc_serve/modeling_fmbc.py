"""FMBC reference model for Hugging Face transformers.

A pre-norm decoder-only Transformer (rotary attention, GELU MLP, sequential or parallel blocks, untied output
head) whose input is the token id's fixed binary code lifted to model width (no parameters), or, in `learned`
mode, the paper's learned embedding table. This is the reference every engine is checked against; it favours
plain, readable PyTorch.

It imports only torch, transformers and its two siblings with relative imports, so the three files copied into
a checkpoint folder load with `trust_remote_code=True` where fmbc_serve is not installed. The engines import
the pieces every FMBC model shares from here, so that each exists once: the input module (`make_input_module`),
the way into the first layer (`stage_input`, `input_stage`, `layer_input`), `make_norm`, `add_norm` and the RoPE
helpers. Each engine computes its blocks in its own decoder layer, in its own idiom.

Data flow, the same in the reference and both engines: token ids -> `input_stage` -> (layer 0's normalised
input, residual stream) -> decoder layers, which take and return `(hidden_states, residual)` as vLLM's and
SGLang's llama do -> final norm -> head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple

from .binary_code import FixedCodeInput, check_token_ids
from .configuration_fmbc import FMBCConfig

# transformers 5.24 renamed the KV cache `past_key_values` -> `cache`: the argument `generate` passes to `forward`, the
# field of the model outputs and the `cache.update` protocol. Before the rename, a `cache` keyword is continuous
# batching's paged cache, which belongs to the attention function, not to the model. The model follows the running
# release (kv_cache, update_cache). tests/unit/test_model.py fails once the oldest supported release needs only `cache`.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def kv_cache(past_key_values: Cache | None, kwargs: dict) -> Cache | None:
    """The model's KV cache, under this release's name (see CACHE_FIELD); both names at once is a caller's mistake.
    From 5.24 `cache` is taken out of `kwargs`; before, it stays there for the attention function."""
    if CACHE_FIELD == "past_key_values":
        return past_key_values
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache as `cache` or as `past_key_values`, not both")
    return past_key_values if cache is None else cache


def update_cache(cache: Cache, key: torch.Tensor, value: torch.Tensor, layer_idx: int,
                 kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Append this step's keys and values to the cache and return all of them. From 5.24 a cache reads (and a paged
    cache writes) the attention kwargs, as transformers' own models pass them."""
    if CACHE_FIELD == "cache":
        return cache.update(key, value, layer_idx, kwargs=kwargs)
    return cache.update(key, value, layer_idx)


try:  # the fused code + first-norm Triton kernel, installed with fmbc-serve; absent in a bare checkpoint folder
    from fmbc_kernels import fused_code_norm, fused_kernel_enabled
except ImportError:
    fused_code_norm = None

    def fused_kernel_enabled(device: torch.device) -> bool:
        return False


def make_norm(config: FMBCConfig, layer_norm: type[nn.Module] = nn.LayerNorm,
              rms_norm: type[nn.Module] = nn.RMSNorm) -> nn.Module:
    """The config's norm (LayerNorm with weight and bias, or RMSNorm with weight) of width d, built from torch's
    classes or, in an engine, from the engine's own (`make_norm(config, LayerNorm, RMSNorm)`)."""
    norm = layer_norm if config.norm_type == "layernorm" else rms_norm
    return norm(config.hidden_size, eps=config.norm_eps)


def rotary_inv_freq(config: FMBCConfig) -> torch.Tensor:
    """RoPE inverse frequencies [rotary_dim / 2] in float32."""
    dim = config.rotary_dim
    return 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., rotary_dim] of the NeoX-style angles for `positions` [...], computed in float32."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.float().to(positions.device)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX RoPE (rotate halves) on the first cos.shape[-1] channels of x [..., head_dim]; the rest pass
    through. cos and sin must broadcast against x."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class FMBCRotaryEmbedding(nn.Module):
    """NeoX-style RoPE angles over the first `rotary_dim` channels of each head."""

    def __init__(self, config: FMBCConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rotary_inv_freq(config), persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq)  # [B, T, rotary_dim]
        return cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads of [B, H, T, D]


def add_norm(norm: nn.Module, hidden_states: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + hidden_states), residual + hidden_states): the add-then-normalise step between blocks."""
    residual = residual + hidden_states
    return norm(residual), residual


def embed_input(embed_tokens: nn.Module, input_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The residual stream's start: the lifted code of a `FixedCodeInput`, or the rows of whatever embedding
    module the model holds now (a table, or a PEFT/LoRA wrapper that replaced it)."""
    if isinstance(embed_tokens, FixedCodeInput):
        return embed_tokens(input_ids, dtype)
    return embed_tokens(input_ids)


def layer_input(layer: nn.Module, stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The `(hidden_states, residual)` pair with which a decoder layer runs on the residual `stream`:
    layer 0 takes its normalised input with the stream (what the input stage gives it), a later layer takes a zero
    output to add to the stream (it normalises the sum itself)."""
    if layer.layer_idx == 0:
        return layer.input_layernorm(stream), stream
    return torch.zeros_like(stream), stream


def make_input_module(config: FMBCConfig, table: Callable[[int, int], nn.Module] = nn.Embedding) -> nn.Module:
    """The residual stream's source: the fixed code (no parameters), or in `learned` mode a V×d table built by
    `table(vocab_size, hidden_size)` (torch's nn.Embedding here, the engine's vocab-parallel one in an engine)."""
    if config.input_mode == "learned":
        return table(config.vocab_size, config.hidden_size)
    return FixedCodeInput(config.binary_code())


def input_stage(embed_tokens: nn.Module, first_norm: nn.Module, eps: float, input_ids: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids -> (layer 0's normalised input, residual stream): the one input stage of every FMBC model.

    The caller passes the modules it holds at this call (`embed_tokens`, `layers[0].input_layernorm`), so a
    module replaced after construction (a PEFT adapter on a learned table) is the one used. With a fixed code on a
    device where `fmbc_kernels` allows it (CUDA), one Triton launch computes the lifted code and its norm;
    otherwise the code (or table) and the norm run as two ops. No range check (it would sync with the device):
    callers validate ids at their boundary."""
    if isinstance(embed_tokens, FixedCodeInput) and fused_kernel_enabled(input_ids.device):
        residual, normed = fused_code_norm(input_ids, embed_tokens.code, first_norm.weight,
                                           getattr(first_norm, "bias", None), eps, dtype, check_ids=False)
        return normed, residual
    embeddings = embed_input(embed_tokens, input_ids, dtype)
    return first_norm(embeddings), embeddings


def stage_input(embed_tokens: nn.Module, first_layer: nn.Module, eps: float, dtype: torch.dtype,
                input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None,
                previous_stage: Mapping[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The `(hidden_states, residual)` pair the first layer of a model (or of a pipeline stage) starts from: the
    pair the previous stage sent (`previous_stage`, vLLM's IntermediateTensors or SGLang's PPProxyTensors), the
    caller's embeddings (`layer_input`), or the ids through `input_stage`. The reference and both engines call
    this, so the three ways in are written once."""
    if previous_stage is not None:
        return previous_stage["hidden_states"], previous_stage["residual"]
    if inputs_embeds is not None:
        return layer_input(first_layer, inputs_embeds)
    return input_stage(embed_tokens, first_layer.input_layernorm, eps, input_ids, dtype)


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out (`attn_implementation="eager"`, and the interface's default) on [B, H, T, D] inputs:
    the output [B, T, H, D] and the weights. `attention_mask` is the additive mask `create_causal_mask` makes; with
    none, queries are causal, as with sdpa (a layer called on its own)."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    elif query.shape[2] > 1:
        length, total = query.shape[2], key.shape[2]
        future = torch.ones(length, total, dtype=torch.bool, device=query.device).triu(total - length + 1)
        weights = weights.masked_fill(future, torch.finfo(weights.dtype).min)
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class FMBCAttention(nn.Module):
    """Multi-head attention with RoPE, computed by the configured attention function (transformers'
    ALL_ATTENTION_FUNCTIONS: eager, sdpa, paged, or an engine's own, as vLLM's Transformers backend registers)."""

    def __init__(self, config: FMBCConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.o_proj = nn.Linear(d, d, bias=bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, past_key_values: Cache | None,
                **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        """`past_key_values` is the model's KV cache under whichever name the release uses (kv_cache); before 5.24 a
        `cache` in kwargs is continuous batching's, for the attention function."""
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)  # -1: the heads of this tensor-parallel rank
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if past_key_values is not None:
            key, value = update_cache(past_key_values, key, value, self.layer_idx, kwargs)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward)
        attn_output, _ = attention_interface(self, query, key, value, attention_mask, scaling=self.scaling,
                                             dropout=0.0, **kwargs)
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous())


class FMBCMLP(nn.Module):
    def __init__(self, config: FMBCConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class FMBCDecoderLayer(nn.Module):
    """Pre-norm block on the `(hidden_states, residual)` pair, as vLLM's and SGLang's llama pass it: the previous
    block's output and the stream it is added to."""

    def __init__(self, config: FMBCConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.block_style = config.block_style
        self.input_layernorm = make_norm(config)
        self.self_attn = FMBCAttention(config, layer_idx)
        if config.block_style != "parallel_shared_norm":
            self.post_attention_layernorm = make_norm(config)
        self.mlp = FMBCMLP(config)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None,
                past_key_values: Cache | None, **kwargs: Unpack[TransformersKwargs]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer 0 receives the input stage's pair (its normalised input and the stream), so it skips the
        add-then-normalise step. A parallel block returns attention + MLP as its output and leaves the stream as it
        came in: the next block (or the final norm) adds both at once, x + attn(ln1(x)) + mlp(ln2(x))."""
        if self.layer_idx > 0:
            hidden_states, residual = add_norm(self.input_layernorm, hidden_states, residual)
        attn_output = self.self_attn(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        if self.block_style == "sequential":
            hidden_states, residual = add_norm(self.post_attention_layernorm, attn_output, residual)
            return self.mlp(hidden_states), residual
        mlp_input = hidden_states if self.block_style == "parallel_shared_norm" else self.post_attention_layernorm(
            residual)
        return attn_output + self.mlp(mlp_input), residual


class FMBCPreTrainedModel(PreTrainedModel):
    config_class = FMBCConfig
    base_model_prefix = "model"
    _no_split_modules = ["FMBCDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True  # attention goes through ALL_ATTENTION_FUNCTIONS (the engines' backends)

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
            module.reset_tables()
        elif isinstance(module, FMBCRotaryEmbedding):
            module.inv_freq.copy_(rotary_inv_freq(self.config))


class FMBCModel(FMBCPreTrainedModel):
    """The decoder stack. `embed_tokens` is the fixed code (no parameters) or, in `learned` mode, a table."""

    def __init__(self, config: FMBCConfig) -> None:
        super().__init__(config)
        self.embed_tokens = make_input_module(config)
        self.layers = nn.ModuleList(FMBCDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = make_norm(config)
        self.rotary_emb = FMBCRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    @can_return_tuple
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.FloatTensor | None = None, use_cache: bool | None = None,
                **kwargs: Unpack[TransformersKwargs]) -> BaseModelOutputWithPast:
        """As transformers' decoders: the attention kwargs (an engine's, continuous batching's) pass through to the
        attention function. The checks on ids and length run eagerly, not inside a compiled graph (an engine's)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = kv_cache(past_key_values, kwargs)
        checking = not torch.compiler.is_compiling()
        if input_ids is not None and checking:  # out-of-range ids raise instead of aliasing onto a real token
            check_token_ids(input_ids, self.config.vocab_size)
        hidden_states, residual = stage_input(self.embed_tokens, self.layers[0], self.config.norm_eps,
                                              self.norm.weight.dtype, input_ids, inputs_embeds)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:  # positions we number: past + this input, which must fit the context
            past_length = cache.get_seq_length() if cache is not None else 0
            batch, length = residual.shape[:2]
            if checking and past_length + length > self.config.max_position_embeddings:
                raise ValueError(f"sequence of {past_length + length} tokens exceeds the context length "
                                 f"max_position_embeddings={self.config.max_position_embeddings}")
            if attention_mask is not None:  # left padding: positions count real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            else:
                position_ids = torch.arange(past_length, past_length + length, device=residual.device)
                position_ids = position_ids.unsqueeze(0).expand(batch, -1)
        mask = create_causal_mask(self.config, residual, attention_mask, cache, position_ids)
        position_embeddings = self.rotary_emb(position_ids)
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, position_embeddings, mask, cache, **kwargs)
        hidden_states, _ = add_norm(self.norm, hidden_states, residual)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache if use_cache else None})


class FMBCForCausalLM(FMBCPreTrainedModel, GenerationMixin):
    """FMBC decoder with its untied output projection; works with `generate()` and a KV cache."""

    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: FMBCConfig) -> None:
        super().__init__(config)
        self.model = FMBCModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=config.lm_head_bias)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | int | None = None,
                 *args, **kwargs):
        """`GenerationMixin.generate`, also accepting the new-token count as the second positional argument
        (`model.generate(input_ids, 3)`), as evaluation scripts for earlier frozen-embedding models call it."""
        if isinstance(generation_config, int):
            kwargs["max_new_tokens"], generation_config = generation_config, None
        return super().generate(inputs, generation_config, *args, **kwargs)

    @can_return_tuple
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
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)})
