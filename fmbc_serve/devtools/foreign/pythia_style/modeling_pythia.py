"""Pythia layout with its parallel residual (x + attn(ln1(x)) + mlp(ln2(x))), per-head fused query_key_value with
biases, rotate-half rotary on a quarter of each head, and the fixed code as the author's earlier models made it:
{0, 1} bits, least significant first, each bit repeated (repeat_interleave) to the width, computed in forward."""

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_pythia import PythiaFMBCConfig


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class PythiaAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.head_size = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        self.rotary_ndims, self.base = int(self.head_size * config.rotary_pct), config.rotary_emb_base
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states):
        b, t, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(b, t, self.heads, 3 * self.head_size).transpose(1, 2)
        q, k, v = qkv.split(self.head_size, dim=-1)
        r = self.rotary_ndims
        inv_freq = 1.0 / (self.base ** (torch.arange(0, r, 2).float() / r))
        angles = torch.outer(torch.arange(t).float(), inv_freq)
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        q = torch.cat((q[..., :r] * cos + rotate_half(q[..., :r]) * sin, q[..., r:]), dim=-1)
        k = torch.cat((k[..., :r] * cos + rotate_half(k[..., :r]) * sin, k[..., r:]), dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(out.transpose(1, 2).reshape(b, t, -1))


class PythiaLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = PythiaAttention(config)
        self.mlp = nn.ModuleDict({"dense_h_to_4h": nn.Linear(config.hidden_size, config.intermediate_size),
                                  "dense_4h_to_h": nn.Linear(config.intermediate_size, config.hidden_size)})

    def forward(self, x):
        attn = self.attention(self.input_layernorm(x))
        mlp = self.mlp["dense_4h_to_h"](F.gelu(self.mlp["dense_h_to_4h"](self.post_attention_layernorm(x))))
        return x + attn + mlp


class PythiaFMBCForCausalLM(PreTrainedModel):
    config_class = PythiaFMBCConfig

    def __init__(self, config):
        super().__init__(config)
        self.gpt_neox = nn.Module()
        self.gpt_neox.layers = nn.ModuleList(PythiaLayer(config) for _ in range(config.num_hidden_layers))
        self.gpt_neox.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        std = getattr(self.config, "initializer_range", 0.1)
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.normal_(0.0, std / 2)
        elif isinstance(module, nn.LayerNorm):  # far from 1 and 0, so that a dropped norm parameter shows
            module.weight.data = 1.0 + 0.1 * torch.randn_like(module.weight)
            module.bias.data = 0.1 * torch.randn_like(module.bias)

    def get_output_embeddings(self):
        return self.embed_out

    def bits(self, input_ids):
        k = max(1, (self.config.vocab_size - 1).bit_length())
        bits = ((input_ids.unsqueeze(-1) >> torch.arange(k)) & 1).float()
        return bits.repeat_interleave(self.config.hidden_size // k, dim=-1)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        if input_ids.shape[1] > self.config.max_sequence_window:
            raise ValueError(f"sequence longer than max_sequence_window={self.config.max_sequence_window}")
        hidden_states = self.bits(input_ids)
        for layer in self.gpt_neox.layers:
            hidden_states = layer(hidden_states)
        return CausalLMOutput(logits=self.embed_out(self.gpt_neox.final_layer_norm(hidden_states)))
