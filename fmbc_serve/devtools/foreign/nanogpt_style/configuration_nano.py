"""A nanoGPT-style FMBC model written by "someone else": GPT-2 names, Conv1D, code computed in forward."""

from transformers import PretrainedConfig


class NanoFMBCConfig(PretrainedConfig):
    model_type = "nano_fmbc"

    def __init__(self, vocab_size=512, n_embd=64, n_layer=2, n_head=4, block_size=64, rotary_dim=8,
                 rope_base=20000.0, code_scale=0.5, **kwargs):
        self.vocab_size, self.n_embd, self.n_layer, self.n_head = vocab_size, n_embd, n_layer, n_head
        self.block_size, self.rotary_dim, self.rope_base = block_size, rotary_dim, rope_base
        self.code_scale = code_scale
        super().__init__(**kwargs)
