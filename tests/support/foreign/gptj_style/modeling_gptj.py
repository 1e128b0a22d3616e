"""GPT-J layout: attention and MLP side by side on one shared norm (x + attn(ln(x)) + mlp(ln(x))), separate
q/k/v/out projections without biases, interleaved ("every two") rotary on part of each head, an MLP with biases
and tanh GELU, an output head with a bias, and a {-1, +1} code of the id's bits in msb order tiled to the width,
held in a frozen table."""

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from .configuration_gptj import GPTJFMBCConfig


def rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class GPTJAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.n_head, self.rotary_dim = config.n_head, config.rotary_dim

    def rope(self, x, t):
        r = self.rotary_dim
        freqs = 1.0 / (10000 ** (torch.arange(0, r, 2).float() / r))
        angles = torch.outer(torch.arange(t).float(), freqs).repeat_interleave(2, dim=-1)
        return torch.cat([x[..., :r] * angles.cos() + rotate_every_two(x[..., :r]) * angles.sin(), x[..., r:]], -1)

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = (p(x).view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.rope(q, t), self.rope(k, t)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.out_proj((att @ v).transpose(1, 2).reshape(b, t, c))


class GPTJBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPTJAttention(config)
        self.fc_in = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.fc_out = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        h = self.ln_1(x)
        return x + self.attn(h) + self.fc_out(F.gelu(self.fc_in(h), approximate="tanh"))


class GPTJFMBCForCausalLM(PreTrainedModel):
    config_class = GPTJFMBCConfig

    def __init__(self, config):
        super().__init__(config)
        k = max(1, (config.vocab_size - 1).bit_length())
        bits = (torch.arange(config.vocab_size).unsqueeze(-1) >> torch.arange(k - 1, -1, -1)) & 1
        self.register_buffer("code", (bits.float() * 2 - 1).repeat(1, -(-config.n_embd // k))[:, :config.n_embd])
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList(GPTJBlock(config) for _ in range(config.n_layer))
        self.transformer.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.1)
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.05)
        elif isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, mean=1.0, std=0.1)
            nn.init.normal_(module.bias, std=0.1)

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, **kwargs):
        x = self.code[input_ids]
        for block in self.transformer.h:
            x = block(x)
        return (self.lm_head(self.transformer.ln_f(x)),)
