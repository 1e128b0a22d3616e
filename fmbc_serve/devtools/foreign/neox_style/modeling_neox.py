"""GPT-NeoX layout (gpt_neox.layers.N.attention.query_key_value, per-head q/k/v order, dense, mlp.dense_h_to_4h),
rotate-half rotary on the first quarter of each head from an inv_freq buffer, a learned input table."""

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_neox import NeoxFMBCConfig


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class NeoxAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.head_size = config.num_attention_heads, config.hidden_size // config.num_attention_heads
        self.rotary_ndims, self.base = int(self.head_size * config.rotary_pct), config.rotary_emb_base
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def compute_inv_freq(self):
        return 1.0 / (self.base ** (torch.arange(0, self.rotary_ndims, 2).float() / self.rotary_ndims))

    def forward(self, hidden_states):
        b, t, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(b, t, self.heads, 3 * self.head_size).transpose(1, 2)
        q, k, v = qkv.split(self.head_size, dim=-1)
        angles = torch.outer(torch.arange(t).float(), self.inv_freq)
        cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        r = self.rotary_ndims
        q = torch.cat((q[..., :r] * cos + rotate_half(q[..., :r]) * sin, q[..., r:]), dim=-1)
        k = torch.cat((k[..., :r] * cos + rotate_half(k[..., :r]) * sin, k[..., r:]), dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(out.transpose(1, 2).reshape(b, t, -1))


class NeoxLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = NeoxAttention(config)
        self.mlp = nn.Sequential()
        self.mlp.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.mlp.act = nn.GELU()
        self.mlp.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states):
        hidden_states = hidden_states + self.attention(self.input_layernorm(hidden_states))
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class NeoxFMBCModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(NeoxLayer(config) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class NeoxFMBCForCausalLM(PreTrainedModel):
    config_class = NeoxFMBCConfig

    def __init__(self, config):
        super().__init__(config)
        self.gpt_neox = NeoxFMBCModel(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.1)
            if getattr(module, "bias", None) is not None:
                nn.init.normal_(module.bias, std=0.05)
        elif isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, mean=1.0, std=0.1)
            nn.init.normal_(module.bias, std=0.1)
        elif isinstance(module, NeoxAttention):  # non-persistent buffer: rebuilt after loading
            module.inv_freq.copy_(module.compute_inv_freq())

    def get_output_embeddings(self):
        return self.embed_out

    def forward(self, input_ids, attention_mask=None, **kwargs):
        hidden_states = self.gpt_neox.embed_in(input_ids)
        for layer in self.gpt_neox.layers:
            hidden_states = layer(hidden_states)
        return CausalLMOutput(logits=self.embed_out(self.gpt_neox.final_layer_norm(hidden_states)))
