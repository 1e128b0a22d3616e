"""A Meta-Llama-style FMBC model: wq/wk/wv/wo, RMSNorm, complex rotary, an affine code stored as a table."""

from transformers import PretrainedConfig


class MetaFMBCConfig(PretrainedConfig):
    model_type = "meta_fmbc"

    def __init__(self, vocab_size=300, dim=64, n_layers=2, n_heads=4, max_seq_len=64, norm_eps=1e-6,
                 rope_theta=500000.0, ffn_dim=160, sharper_layer=-1, **kwargs):
        self.vocab_size, self.dim, self.n_layers, self.n_heads = vocab_size, dim, n_layers, n_heads
        self.max_seq_len, self.norm_eps, self.rope_theta, self.ffn_dim = max_seq_len, norm_eps, rope_theta, ffn_dim
        self.sharper_layer = sharper_layer  # a layer whose attention is twice as sharp (not of the family)
        super().__init__(**kwargs)
