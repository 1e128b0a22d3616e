"""A Pythia-style FMBC model written by "someone else": its context length under a key of its own."""

from transformers import PretrainedConfig


class PythiaFMBCConfig(PretrainedConfig):
    model_type = "pythia_fmbc"

    def __init__(self, vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_sequence_window=96, rotary_pct=0.25, rotary_emb_base=10000, layer_norm_eps=1e-5,
                 intermediate_size=256, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.max_sequence_window = num_attention_heads, max_sequence_window
        self.rotary_pct, self.rotary_emb_base, self.layer_norm_eps = rotary_pct, rotary_emb_base, layer_norm_eps
        self.intermediate_size = intermediate_size
        super().__init__(**kwargs)
