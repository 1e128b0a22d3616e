"""A GPT-J-style FMBC model written by "someone else"."""

from transformers import PretrainedConfig


class GPTJFMBCConfig(PretrainedConfig):
    model_type = "gptj_fmbc"

    def __init__(self, vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8,
                 layer_norm_epsilon=1e-5, **kwargs):
        self.vocab_size, self.n_embd, self.n_layer, self.n_head = vocab_size, n_embd, n_layer, n_head
        self.n_positions, self.rotary_dim, self.layer_norm_epsilon = n_positions, rotary_dim, layer_norm_epsilon
        super().__init__(**kwargs)
