"""nanoGPT layout (transformer.h.N.attn.c_attn ...), GPT-2 Conv1D weights, a {-s,+s} code of the id's bits in
msb order tiled to the width, computed in forward; GPT-J rotary (every two channels) on part of each head."""

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .configuration_nano import NanoFMBCConfig


def rotate_every_two(x):
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_attn = Conv1D(3 * config.n_embd, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.n_head, self.rotary_dim, self.base = config.n_head, config.rotary_dim, config.rope_base

    def rope(self, x, t):
        r = self.rotary_dim
        freqs = 1.0 / (self.base ** (torch.arange(0, r, 2).float() / r))
        angles = torch.outer(torch.arange(t).float(), freqs).repeat_interleave(2, dim=-1)
        rot = x[..., :r] * angles.cos() + rotate_every_two(x[..., :r]) * angles.sin()
        return torch.cat([rot, x[..., r:]], dim=-1)

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        q, k = self.rope(q, t), self.rope(k, t)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        return self.c_proj((att @ v).transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Conv1D(4 * config.n_embd, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, 4 * config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoFMBCForCausalLM(PreTrainedModel):
    config_class = NanoFMBCConfig

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
                                              ln_f=nn.LayerNorm(config.n_embd)))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, Conv1D)):
            nn.init.normal_(module.weight, std=0.1)
            if module.bias is not None:
                nn.init.normal_(module.bias, std=0.05)
        elif isinstance(module, nn.LayerNorm):
            nn.init.normal_(module.weight, mean=1.0, std=0.1)
            nn.init.normal_(module.bias, std=0.1)

    def get_output_embeddings(self):
        return self.lm_head

    def code(self, idx):
        k = max(1, (self.config.vocab_size - 1).bit_length())
        bits = (idx.unsqueeze(-1) >> torch.arange(k - 1, -1, -1)) & 1
        signs = (bits.float() * 2 - 1) * self.config.code_scale
        return signs.repeat(1, 1, -(-self.config.n_embd // k))[..., :self.config.n_embd]

    def forward(self, idx, targets=None, **kwargs):
        x = self.code(idx)
        for block in self.transformer.h:
            x = block(x)
        return (self.lm_head(self.transformer.ln_f(x)), None)
