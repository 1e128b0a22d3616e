"""Meta's layout (layers.N.attention.wq, feed_forward.w1/w2, attention_norm/ffn_norm, output), rotary as complex
multiplication of channel pairs, and the input code stored as a frozen table buffer `codes` [V, dim]: the id's
bits recoded by an invertible affine map over GF(2) and spread over the width by a fixed scrambled map."""

import math
import random

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel

from .configuration_meta import MetaFMBCConfig


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def apply_rotary_emb(x, freqs_cis):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis).flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args, sharpness=1.0):
        super().__init__()
        self.n_heads, self.head_dim, self.sharpness = args.n_heads, args.dim // args.n_heads, sharpness
        self.wq = nn.Linear(args.dim, args.dim, bias=False)
        self.wk = nn.Linear(args.dim, args.dim, bias=False)
        self.wv = nn.Linear(args.dim, args.dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)

    def forward(self, x, freqs_cis):
        b, t, _ = x.shape
        q, k, v = (w(x).view(b, t, self.n_heads, self.head_dim) for w in (self.wq, self.wk, self.wv))
        q, k = apply_rotary_emb(q, freqs_cis[:, None]), apply_rotary_emb(k, freqs_cis[:, None])
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.sharpness / math.sqrt(self.head_dim)
        scores = scores + torch.full((t, t), float("-inf")).triu(1)
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
        return self.wo(out.reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.w2 = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, args, layer_id):
        super().__init__()
        self.attention = Attention(args, 2.0 if layer_id == args.sharper_layer else 1.0)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs_cis):
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


def gf2_rank(rows):
    rank, rows = 0, list(rows)
    for bit in range(max(rows).bit_length()):
        pivot = next((r for r in rows if (r >> bit) & 1), None)
        if pivot is not None:
            rows = [r ^ pivot if (r >> bit) & 1 else r for r in rows if r is not pivot]
            rank += 1
    return rank


def affine_code_table(vocab, dim, seed=7):
    """Rows: bits of A·id ⊕ b (A invertible over GF(2)), value 2.0 for a 1 bit, width position p holds bit
    lift[p] for a seeded scrambled map that uses every bit."""
    k = (vocab - 1).bit_length()
    rng = random.Random(seed)
    while True:
        rows = [rng.randrange(1, 1 << k) for _ in range(k)]
        if gf2_rank(rows) == k:
            break
    a = torch.tensor([[(row >> j) & 1 for j in range(k)] for row in rows])
    b = torch.tensor([rng.randrange(2) for _ in range(k)])
    g = torch.Generator().manual_seed(seed)
    bits = (torch.arange(vocab).unsqueeze(1) >> torch.arange(k)) & 1
    recoded = ((bits @ a.T) + b) % 2
    lift = torch.cat([torch.arange(k), torch.randint(0, k, (dim - k,), generator=g)])[torch.randperm(dim, generator=g)]
    return recoded[:, lift].float() * 2.0


class MetaFMBCForCausalLM(PreTrainedModel):
    config_class = MetaFMBCConfig

    def __init__(self, params):
        super().__init__(params)
        self.register_buffer("codes", affine_code_table(params.vocab_size, params.dim))
        self.layers = nn.ModuleList(TransformerBlock(params, i) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.1)
        elif isinstance(module, RMSNorm):
            nn.init.normal_(module.weight, mean=1.0, std=0.1)

    def get_output_embeddings(self):
        return self.output

    def forward(self, tokens, **kwargs):
        t = tokens.shape[1]
        head_dim = self.config.dim // self.config.n_heads
        freqs = 1.0 / (self.config.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
        freqs_cis = torch.polar(torch.ones(t, head_dim // 2), torch.outer(torch.arange(t).float(), freqs))
        h = self.codes[tokens]
        for layer in self.layers:
            h = layer(h, freqs_cis)
        return self.output(self.norm(h))
