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


def sinusoidal_positions(num_pos, dim):
    """[num_pos, dim] table: sin of every angle in the first half, cos in the second (as GPT-J caches it)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64) / dim))
    sinusoid = torch.einsum("i , j -> i j", torch.arange(num_pos, dtype=torch.int64).float(), inv_freq).float()
    return torch.cat((torch.sin(sinusoid), torch.cos(sinusoid)), dim=1)


class GPTJAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.out_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.n_head, self.rotary_dim = config.n_head, config.rotary_dim
        self.register_buffer("embed_positions", sinusoidal_positions(config.n_positions, config.rotary_dim),
                             persistent=False)

    def apply_rotary(self, x, sincos):
        half = sincos.shape[-1] // 2
        sin, cos = (torch.repeat_interleave(t, 2, dim=-1)[:, None] for t in torch.split(sincos, half, -1))
        rot = x[..., :self.rotary_dim]
        return torch.cat([rot * cos + rotate_every_two(rot) * sin, x[..., self.rotary_dim:]], dim=-1)

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = (p(x).view(b, t, self.n_head, c // self.n_head) for p in (self.q_proj, self.k_proj, self.v_proj))
        sincos = self.embed_positions[:t]
        q, k = (self.apply_rotary(z, sincos).transpose(1, 2) for z in (q, k))
        v = v.transpose(1, 2)
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
        for name, param in module.named_parameters(recurse=False):  # matrices 0.1, biases 0.05, norm gains ~1
            param.data.normal_(1.0 if isinstance(module, nn.LayerNorm) and name == "weight" else 0.0,
                               0.1 if param.dim() > 1 or isinstance(module, nn.LayerNorm) else 0.05)
        if isinstance(module, GPTJAttention):  # non-persistent: rebuilt after loading
            module.embed_positions.copy_(sinusoidal_positions(*module.embed_positions.shape))

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, **kwargs):
        x = self.code[input_ids]
        for block in self.transformer.h:
            x = block(x)
        return (self.lm_head(self.transformer.ln_f(x)),)
