"""FMBC model configuration.

Every architecture choice that the paper (arXiv 2605.09751) leaves open is a field here with a documented
default, never a constant in code; docs/format.md lists each with its reason. Like binary_code.py, this file
is copied into checkpoint folders and imports only transformers, torch and its sibling.
"""

from __future__ import annotations

import re

import transformers
from transformers import PretrainedConfig

from .binary_code import BinaryCode, CodeError, check_code_options, code_bits

# The transformers releases this code (and so every checkpoint's remote code) is tested on, oldest and newest: CI
# runs the core suite on both (fmbc_serve/versions.py CORE_RANGES; tests/unit/test_versions.py keeps them equal).
TRANSFORMERS_TESTED = ("5.16.1", "5.24.0")


def check_transformers(running: str = transformers.__version__) -> None:
    """Refuse, in one line, a transformers older than the oldest tested release: its cache and generate API differ
    and the model would answer wrongly or fail deep inside generate. A newer release is not refused: the model follows
    transformers' own modeling conventions (attention interface, cache protocol), which newer releases keep."""
    def release(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", version).group(0).split("."))

    if release(running) < release(TRANSFORMERS_TESTED[0]):
        raise ImportError(f"FMBC model code needs transformers >= {TRANSFORMERS_TESTED[0]} (tested "
                          f"{TRANSFORMERS_TESTED[0]} to {TRANSFORMERS_TESTED[1]}); this environment has transformers "
                          f"{running}: pip install 'transformers>={TRANSFORMERS_TESTED[0]}'")


check_transformers()

INPUT_MODES = ("binary", "affine", "learned")
# How a block combines attention and MLP: one after the other (Llama, GPT-2), side by side on the same input with a
# norm each (GPT-NeoX / Pythia's parallel residual), or side by side on one shared norm (GPT-J).
BLOCK_STYLES = ("sequential", "parallel", "parallel_shared_norm")
NORM_TYPES = ("layernorm", "rmsnorm")
# hidden_act -> (torch's F.gelu `approximate`, the transformers ACT2FN name that vLLM's and SGLang's get_act_fn take)
ACTIVATIONS = {"gelu": ("none", "gelu"), "gelu_tanh": ("tanh", "gelu_pytorch_tanh")}
# BinaryCode field -> the config field it comes from (CodeError.field names the former).
CODE_FIELDS = {"vocab_size": "vocab_size", "width": "hidden_size", "bit_order": "code_bit_order",
               "values": "code_values", "scale": "code_scale", "layout": "code_layout",
               "affine_rows": "affine_rows", "affine_bias": "affine_bias",
               "lift_map": "code_lift_map"}


class ConfigError(ValueError):
    """A config field that is invalid or inconsistent with the others; the message names the field."""


class FMBCConfig(PretrainedConfig):
    """Configuration of a decoder-only Transformer whose input is the token id's fixed binary code.

    Args:
        vocab_size: V. The code uses K = ceil(log2 V) bits.
        hidden_size: model width d.
        num_hidden_layers, num_attention_heads: depth and heads (head_dim = d / heads).
        intermediate_size: GELU MLP width (default 4·d).
        max_position_embeddings: context length.
        input_mode: `binary` (fixed code), `affine` (fixed code recoded by c' = A·c ⊕ b over GF(2)) or
            `learned` (the paper's baseline: a trainable V×d table, our comparison twin).
        code_bit_order: `lsb` or `msb` first. code_values: `zero_one` ({0,1}) or `sign` ({-1,+1}).
        code_scale: factor applied to the code values (non-zero; negative flips which value a 1 bit takes).
        code_layout: `repeat` (tile the whole code), `interleave` (repeat each bit), truncated to d, or `map`.
        code_lift_map: with `map`, the code position each of the d width positions holds (written by `fmbc
            import` when a foreign checkpoint lifts its bits in another fixed order).
        affine_rows: A as K row bitmasks (affine mode). affine_bias: b as a K-bit integer (affine mode).
        norm_type: `layernorm` (weight and bias) or `rmsnorm` (weight). norm_eps: its epsilon.
        attention_bias, mlp_bias: biases on the attention and MLP projections. lm_head_bias: a bias on the output
            head (GPT-J has one).
        block_style: `sequential` (x + attn(ln1(x)), then + mlp(ln2(.))), `parallel` (x + attn(ln1(x)) +
            mlp(ln2(x)), GPT-NeoX) or `parallel_shared_norm` (x + attn(ln(x)) + mlp(ln(x)), GPT-J: no second norm).
        hidden_act: `gelu` (exact, erf) or `gelu_tanh`.
        rope_theta: RoPE base. partial_rotary_factor: fraction of head_dim that is rotated (NeoX-style halves).
        initializer_range: std of the normal init of weights.
    """

    model_type = "fmbc"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # How transformers' tensor parallelism (and the engines' Transformers backends) shard the blocks: the heads and
    # the MLP's hidden units split across ranks, each block's two output projections summed over them.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }

    def __init__(
        self,
        vocab_size: int = 65536,
        hidden_size: int = 1024,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 1024,
        input_mode: str = "binary",
        code_bit_order: str = "lsb",
        code_values: str = "zero_one",
        code_scale: float = 1.0,
        code_layout: str = "interleave",
        affine_rows: list[int] | None = None,
        affine_bias: int | None = None,
        code_lift_map: list[int] | None = None,
        norm_type: str = "layernorm",
        norm_eps: float = 1e-5,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        lm_head_bias: bool = False,
        block_style: str = "sequential",
        hidden_act: str = "gelu",
        rope_theta: float = 10000.0,
        partial_rotary_factor: float = 1.0,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = 4 * hidden_size if intermediate_size is None else intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.input_mode = input_mode
        self.code_bit_order = code_bit_order
        self.code_values = code_values
        self.code_scale = float(code_scale)
        self.code_layout = code_layout
        self.affine_rows = None if affine_rows is None else [int(r) for r in affine_rows]
        self.affine_bias = affine_bias
        self.code_lift_map = None if code_lift_map is None else [int(p) for p in code_lift_map]
        self.norm_type = norm_type
        self.norm_eps = norm_eps
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.lm_head_bias = lm_head_bias
        self.block_style = block_style
        self.hidden_act = hidden_act
        self.rope_theta = float(rope_theta)
        # `rotary_pct`: this field's name in checkpoints written before it took the name transformers and the engines
        # read (vLLM warns that it is deprecated).
        self.partial_rotary_factor = float(kwargs.pop("rotary_pct", partial_rotary_factor))
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        self.validate_fields()

    def validate_fields(self) -> None:
        """Reject inconsistent fields with a message that names the field."""

        def need(ok: bool, field: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"FMBCConfig.{field}: {message}")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "intermediate_size", "max_position_embeddings"):
            value = getattr(self, field)
            need(isinstance(value, int) and value > 0, field, f"must be a positive integer, got {value!r}")
        need(self.vocab_size >= 2, "vocab_size", f"must be >= 2, got {self.vocab_size}")
        need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
             f"must divide hidden_size ({self.hidden_size}), got {self.num_attention_heads}")
        need(self.input_mode in INPUT_MODES, "input_mode", f"must be one of {INPUT_MODES}, got {self.input_mode!r}")
        need(self.norm_type in NORM_TYPES, "norm_type", f"must be one of {NORM_TYPES}, got {self.norm_type!r}")
        need(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        need(self.block_style in BLOCK_STYLES, "block_style",
             f"must be one of {BLOCK_STYLES}, got {self.block_style!r}")
        need(self.hidden_act in ACTIVATIONS, "hidden_act",
             f"must be one of {tuple(ACTIVATIONS)}, got {self.hidden_act!r}")
        need(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        need(0 < self.partial_rotary_factor <= 1, "partial_rotary_factor",
             f"must be in (0, 1], got {self.partial_rotary_factor}")
        need(self.rotary_dim >= 2 and self.rotary_dim % 2 == 0, "partial_rotary_factor",
             f"gives rotary_dim {self.rotary_dim} of head_dim {self.head_dim}; it must be even and >= 2")
        need(not self.tie_word_embeddings, "tie_word_embeddings",
             "must be False: the output projection is untied (and the fixed modes have no table to tie to)")
        need(self.input_mode == "affine" or (self.affine_rows is None and self.affine_bias is None),
             "affine_rows", f"is only used with input_mode='affine' (input_mode is {self.input_mode!r})")
        if self.input_mode == "affine":
            need(self.affine_rows is not None and self.affine_bias is not None, "affine_rows",
                 "input_mode='affine' needs affine_rows (A as K row bitmasks) and affine_bias (b)")
        # The code object validates its own fields; its error names the field, mapped to ours here.
        try:
            if self.input_mode == "learned":
                check_code_options(self.code_bit_order, self.code_values, self.code_scale, self.code_layout)
            else:
                self.binary_code()
        except CodeError as err:
            raise ConfigError(f"FMBCConfig.{CODE_FIELDS[err.field]}: {err}") from err

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def gelu_approximate(self) -> str:
        """torch's `F.gelu(approximate=...)` for hidden_act."""
        return ACTIVATIONS[self.hidden_act][0]

    @property
    def engine_activation(self) -> str:
        """hidden_act by the name the engines' `get_act_fn` (transformers' ACT2FN) knows it."""
        return ACTIVATIONS[self.hidden_act][1]

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_code_bits(self) -> int:
        return code_bits(self.vocab_size)

    def binary_code(self) -> BinaryCode:
        """The config's code. Raises for `learned`, which has no fixed code."""
        if self.input_mode == "learned":
            raise ValueError("input_mode='learned' has no fixed binary code")
        affine = self.input_mode == "affine"
        return BinaryCode(
            vocab_size=self.vocab_size,
            width=self.hidden_size,
            bit_order=self.code_bit_order,
            values=self.code_values,
            scale=self.code_scale,
            layout=self.code_layout,
            affine_rows=tuple(self.affine_rows) if affine else None,
            affine_bias=self.affine_bias if affine else 0,
            lift_map=None if self.code_lift_map is None else tuple(self.code_lift_map),
        )
