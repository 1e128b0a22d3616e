"""The importer's pure parts, one by one, on inputs built here: code solving, norm and activation probes, the
rotary base search, q/k/v conversion, structure discovery and the report. tests/unit/test_import.py runs them
together on whole foreign checkpoints."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from support.checkpoints import scrambled_lift_map
from torch import nn

from fmbc_serve.binary_code import BinaryCode, random_affine
from fmbc_serve.configuration_fmbc import FMBCConfig
from fmbc_serve.importer.attention import config_value, fit_theta, rotary_fraction
from fmbc_serve.importer.code import solve_code
from fmbc_serve.importer.convert import Attention, complete, split_qkv
from fmbc_serve.importer.errors import ImportRefused
from fmbc_serve.importer.facts import context_length, parse_overrides
from fmbc_serve.importer.probes import probe_activation, probe_norm, shared_norm, snap_eps
from fmbc_serve.importer.report import Recognised, format_report
from fmbc_serve.importer.source import observe_stream
from fmbc_serve.importer.structure import (
    BlockLayout,
    Structure,
    assign_roles,
    block_layout,
    block_parts,
    find_blocks,
    matrix,
    norm_tensors,
)
from fmbc_serve.modeling_fmbc import apply_rotary, rotary_cos_sin

VOCAB, WIDTH = 300, 50


def code_of(fields: dict) -> BinaryCode:
    """The code a solved config describes."""
    return FMBCConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_attention_heads=1, **fields).binary_code()


@pytest.mark.parametrize("code", [
    BinaryCode(VOCAB, WIDTH, bit_order="msb", values="sign", scale=0.5, layout="repeat"),
    BinaryCode(VOCAB, WIDTH, bit_order="lsb", values="zero_one", scale=-2.0, layout="interleave"),
    BinaryCode(VOCAB, WIDTH, layout="map", lift_map=scrambled_lift_map(9, WIDTH)),
    BinaryCode(VOCAB, WIDTH, layout="repeat", affine_rows=tuple(random_affine(9, 4)[0]),
               affine_bias=random_affine(9, 4)[1]),
], ids=["msb-sign-repeat", "flipped-bits", "scrambled-map", "affine"])
def test_solve_code_reproduces_every_code_exactly(code: BinaryCode) -> None:
    table = code.embed(torch.arange(VOCAB))
    fields, _ = solve_code(table)
    assert fields["input_mode"] == ("affine" if code.affine_rows else "binary")
    assert torch.equal(code_of(fields).embed(torch.arange(VOCAB)), table)


def test_solve_code_names_the_plain_options() -> None:
    fields, _ = solve_code(BinaryCode(VOCAB, WIDTH, bit_order="msb", values="sign", scale=0.5,
                                      layout="repeat").embed(torch.arange(VOCAB)))
    assert fields == {"input_mode": "binary", "code_bit_order": "msb", "code_values": "sign", "code_scale": 0.5,
                      "code_layout": "repeat"}


@pytest.mark.parametrize(("table", "note"), [
    (torch.randn(VOCAB, WIDTH), "not a two-valued table"),
    (torch.ones(VOCAB, WIDTH), "every id has the same input"),
    (torch.randint(0, 2, (VOCAB, WIDTH)).float() * 3 + 1, "neither {0, s} nor {-s, s}"),
])
def test_a_table_that_is_no_code_is_learned(table: torch.Tensor, note: str) -> None:
    fields, why = solve_code(table)
    assert fields == {"input_mode": "learned"} and note in why


@pytest.mark.parametrize("damage", [0.25, "flip"])
def test_a_damaged_code_is_refused_naming_the_id(damage) -> None:
    table = BinaryCode(VOCAB, WIDTH).embed(torch.arange(VOCAB))
    table[123, 7] = 1.0 - table[123, 7] if damage == "flip" else damage
    with pytest.raises(ImportRefused, match=r"except at id\(s\) 123\b"):
        solve_code(table)


@pytest.mark.parametrize(("norm", "kind", "eps"), [
    (nn.LayerNorm(64, eps=1e-6), "layernorm", 1e-6),
    (nn.LayerNorm(64, eps=3.3e-4), "layernorm", 3.3e-4),
    (nn.LayerNorm(64, eps=1e-5, bias=False), "layernorm", 1e-5),
    (nn.RMSNorm(64, eps=1e-5), "rmsnorm", 1e-5),
    (nn.RMSNorm(64, eps=1e-8), "rmsnorm", 1e-8),
], ids=["layernorm-1e-6", "layernorm-odd-eps", "layernorm-no-bias", "rmsnorm-1e-5", "rmsnorm-1e-8"])
def test_probe_norm_finds_type_and_eps(norm: nn.Module, kind: str, eps: float) -> None:
    with torch.no_grad():
        for param in norm.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    assert probe_norm(norm, 64) == (kind, eps)


def test_probe_norm_refuses_what_is_no_norm() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(64) * 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    with pytest.raises(ImportRefused, match="neither LayerNorm nor RMSNorm"):
        probe_norm(Scale(), 64)


@pytest.mark.parametrize(("estimate", "snapped"), [(1.01e-5, 1e-5), (0.99e-6, 1e-6), (2.5e-4, 2.5e-4),
                                                   (1.234567e-3, 1.23e-3)])
def test_snap_eps_keeps_common_values_and_three_digits(estimate: float, snapped: float) -> None:
    assert snap_eps(estimate) == snapped


class MLP(nn.Module):
    def __init__(self, act) -> None:
        super().__init__()
        self.up, self.down, self.act = nn.Linear(32, 128), nn.Linear(128, 32), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize(("act", "found"), [(F.gelu, ["gelu"]), (lambda x: F.gelu(x, approximate="tanh"),
                                                                   ["gelu_tanh"])], ids=["exact", "tanh"])
def test_probe_activation_tells_exact_from_tanh_gelu(act, found: list[str]) -> None:
    mlp = MLP(act)
    assert probe_activation(mlp, mlp.up, mlp.down, 32) == found


def test_probe_activation_refuses_another_activation() -> None:
    mlp = MLP(F.relu)
    with pytest.raises(ImportRefused, match="is not up -> GELU"):
        probe_activation(mlp, mlp.up, mlp.down, 32)


@pytest.mark.parametrize("theta", [20000.0, 1234.0, 5e6])
def test_fit_theta_finds_the_shortest_base_that_fits(theta: float) -> None:
    assert fit_theta(lambda t: abs(math.log(t / theta))) == theta


@pytest.mark.parametrize(("rotary_dim", "head_dim"), [(8, 16), (10, 18), (6, 36), (2, 96), (64, 256)])
def test_partial_rotary_factor_gives_back_the_rotated_dims(rotary_dim: int, head_dim: int) -> None:
    pct = rotary_fraction(rotary_dim, head_dim)
    assert int(head_dim * pct) == rotary_dim and 0 < pct <= 1


def test_split_qkv_reads_both_fused_orders() -> None:
    heads, head_dim = 4, 8
    width = heads * head_dim
    q, k, v = (torch.randn(width, width) for _ in range(3))
    stacked = torch.cat([q, k, v])
    per_head = torch.stack([t.reshape(heads, head_dim, width) for t in (q, k, v)], dim=1).reshape(3 * width, width)
    for fused, order in ((stacked, "qkv"), (per_head, "per_head")):
        parts = split_qkv([fused], Attention(heads, order, "rotate_half", head_dim, 1e4), width)
        assert all(torch.equal(a, b) for a, b in zip(parts, (q, k, v), strict=True))


def rotate_interleaved(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """GPT-J's rotary: pairs (2i, 2i+1) rotated by position * theta^(-2i/r), the rest passed through."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    angles = positions.float()[:, None] * inv_freq  # [T, r/2]
    even, odd = x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]
    cos, sin = angles.cos(), angles.sin()
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)


def test_interleaved_rotary_becomes_rotate_half_with_the_same_scores() -> None:
    """Permuting q/k rows within a head turns interleaved pairs into rotate-half pairs: every q·k is unchanged."""
    heads, head_dim, rotary_dim, theta = 2, 16, 8, 1e4
    width = heads * head_dim
    wq, wk = torch.randn(width, width), torch.randn(width, width)
    x, positions = torch.randn(5, width), torch.arange(5)
    attention = Attention(heads, None, "interleaved", rotary_dim, theta)
    pq, pk, _ = split_qkv([wq, wk, torch.zeros(width, width)], attention, width)

    def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return torch.einsum("thd,shd->hts", q, k)

    def heads_of(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(5, heads, head_dim)

    theirs = scores(rotate_interleaved(heads_of(x @ wq.t()), positions[:, None], rotary_dim, theta),
                    rotate_interleaved(heads_of(x @ wk.t()), positions[:, None], rotary_dim, theta))
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    cos, sin = (t.unsqueeze(1) for t in rotary_cos_sin(positions, inv_freq))
    ours = scores(apply_rotary(heads_of(x @ pq.t()), cos, sin), apply_rotary(heads_of(x @ pk.t()), cos, sin))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-5)


def test_assign_roles_by_name_then_registration_order() -> None:
    assert assign_roles(["attn.wk", "attn.wq", "attn.wo", "attn.wv"]) == {
        "q": "attn.wq", "k": "attn.wk", "v": "attn.wv", "o": "attn.wo"}
    assert assign_roles(["a", "b", "c", "d"]) == {"q": "a", "k": "b", "v": "c", "o": "d"}


class Block(nn.Module):
    def __init__(self, width: int = 16, gated: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.ModuleDict({name: nn.Linear(width, width) for name in ("wq", "wk", "wv", "wo")})
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(width, 4 * width), "fc2": nn.Linear(4 * width, width)})
        if gated:
            self.mlp["gate"] = nn.Linear(width, 4 * width)


def test_block_parts_from_shapes() -> None:
    parts = block_parts(Block(), 16)
    assert (parts.norms, parts.qkv, parts.out, parts.up, parts.down) == (
        ["ln1", "ln2"], ("attn.wq", "attn.wk", "attn.wv"), "attn.wo", "mlp.fc1", "mlp.fc2")
    with pytest.raises(ImportRefused, match="a gated MLP is not of this family"):
        block_parts(Block(gated=True), 16)


class StyledBlock(Block):
    """A block that combines attention and MLP in `style`, its norms declared in `order`."""

    def __init__(self, style: str, order: tuple[str, str]) -> None:
        super().__init__()
        self.style = style
        if style == "parallel_shared_norm":
            del self.ln2
        elif order != ("ln1", "ln2"):  # declare ln2 first: data flow, not order, says which is which
            self._modules = {name: self._modules[name] for name in ("ln2", "ln1", "attn", "mlp")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        attn = self.attn["wo"](self.attn["wq"](h) + self.attn["wk"](h) + self.attn["wv"](h))
        if self.style == "sequential":
            x = x + attn
            return x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.ln2(x))))
        second = self.ln1 if self.style == "parallel_shared_norm" else self.ln2
        return x + attn + self.mlp["fc2"](F.gelu(self.mlp["fc1"](second(x))))


class Styled(nn.Module):
    def __init__(self, style: str, order: tuple[str, str] = ("ln1", "ln2")) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([StyledBlock(style, order)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](F.one_hot(ids % 16, 16).float())


@pytest.mark.parametrize(("style", "order"), [("sequential", ("ln1", "ln2")), ("sequential", ("ln2", "ln1")),
                                              ("parallel", ("ln1", "ln2")), ("parallel", ("ln2", "ln1")),
                                              ("parallel_shared_norm", ("ln1", "ln2"))])
def test_block_layout_reads_the_norms_and_the_style_from_the_data_flow(style: str, order: tuple[str, str]) -> None:
    model = Styled(style, order)
    layout = block_layout(model, model.blocks[0], 16, 16)
    assert layout.block_style == style and layout.attn_norm == "ln1"
    assert layout.mlp_norm == (None if style == "parallel_shared_norm" else "ln2")


def test_observing_leaves_no_hook_behind_even_when_stopped_early() -> None:
    model = Styled("sequential")
    stream = observe_stream(model, [model.blocks[0]], torch.zeros(1, 3, dtype=torch.long), stop_after_first=True)
    assert stream[0].shape == (1, 3, 16) and not model.blocks[0]._forward_pre_hooks


def test_the_norms_must_agree_throughout() -> None:
    """FMBC has one norm: a model whose norms differ anywhere (here one block's MLP norm) is refused, naming it."""
    model = nn.Module()
    model.h, model.ln_f = nn.ModuleList(Block() for _ in range(2)), nn.LayerNorm(16)
    layout = BlockLayout("ln1", "ln2", ("attn.wq", "attn.wk", "attn.wv"), "attn.wo", "mlp.fc1", "mlp.fc2",
                         "sequential")
    structure = Structure("h", model.h, layout, "ln_f", "head", width=16, vocab=16)
    assert shared_norm(model, structure) == ("layernorm", 1e-5)
    model.h[1].ln2.eps = 1e-6
    with pytest.raises(ImportRefused, match="the model's norms differ: h.1.ln2 is layernorm with eps 1e-06"):
        shared_norm(model, structure)


def test_find_blocks_takes_the_biggest_stack_of_identical_blocks() -> None:
    model = nn.Module()
    model.extras = nn.ModuleList(nn.Linear(2, 2) for _ in range(5))
    model.h = nn.ModuleList(Block() for _ in range(3))
    name, blocks = find_blocks(model)
    assert name == "h" and len(blocks) == 3


def test_norm_tensors_and_matrix_whatever_the_names() -> None:
    norm = nn.Module()
    norm.gamma, norm.beta = nn.Parameter(torch.ones(4)), nn.Parameter(torch.zeros(4))
    scale, shift = norm_tensors(norm)
    assert scale is norm.gamma and shift is norm.beta
    from transformers.pytorch_utils import Conv1D

    assert matrix(nn.Linear(5, 3)).shape == (3, 5)
    assert matrix(Conv1D(nf=3, nx=5)).shape == (3, 5)  # GPT-2 stores [in, out]


def test_config_value_takes_the_first_key_set() -> None:
    config = SimpleNamespace(n_positions=None, block_size=128, max_seq_len=64)
    assert config_value(config, ("max_position_embeddings", "n_positions", "block_size", "max_seq_len")) == 128


def test_complete_adds_zero_biases_and_drops_nothing_it_needs() -> None:
    expected = {"a.weight": (2, 2), "a.bias": (2,)}
    done = complete({"a.weight": torch.ones(2, 2)}, expected)
    assert set(done) == set(expected) and torch.equal(done["a.bias"], torch.zeros(2))


@pytest.mark.parametrize("fused_order", [None, "per_head"])
def test_the_report_names_a_fused_order_only_for_a_fused_qkv(fused_order: str | None) -> None:
    recognised = Recognised(
        source="src", code="solved", activation="gelu", names={"h.{i}.ln_1": "model.layers.{i}.input_layernorm"},
        config={"input_mode": "learned", "vocab_size": 8, "hidden_size": 16, "num_hidden_layers": 1,
                "intermediate_size": 64, "max_position_embeddings": 32, "attention_bias": False, "mlp_bias": False},
        attention={"heads": 2, "fused_order": fused_order, "rotary": "rotate_half", "rotary_dim": 8, "theta": 1e4},
        norm={"type": "layernorm", "eps": 1e-5})
    table = format_report(recognised)
    assert ("fused qkv order per_head" in table) == (fused_order is not None)
    assert "name h.{i}.ln_1" in table


class Foreign(nn.Module):
    """A stand-in foreign model for the context-length search: its config, buffers, and an optional length
    check in forward (before its one block)."""

    def __init__(self, config: dict, limit: int | None = None, buffers: dict | None = None) -> None:
        super().__init__()
        self.config = SimpleNamespace(**config, to_dict=lambda: dict(config))
        self.block, self.limit = nn.Linear(4, 4), limit
        for name, tensor in (buffers or {}).items():
            self.register_buffer(name, tensor)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.limit is not None and ids.shape[1] > self.limit:
            raise ValueError("too long")
        return self.block(torch.zeros(*ids.shape, 4))


TOKENIZER = SimpleNamespace(model_max_length=int(1e30))


@pytest.mark.parametrize(("model", "tokenizer", "expected"), [
    (Foreign({"n_positions": 128}), TOKENIZER, (128, "config key n_positions")),
    (Foreign({"max_sequence_window": 96}), TOKENIZER, (96, "config key max_sequence_window")),
    (Foreign({"rope_scaling": {"original_max_position_embeddings": 4096}}), TOKENIZER,
     (4096, "config key rope_scaling.original_max_position_embeddings")),
    (Foreign({"train_seq_len": 128, "ctx_window": 96}, limit=96), TOKENIZER,
     (96, "config key ctx_window and the model's own length check")),
    (Foreign({}, limit=300), TOKENIZER, (300, "the model's own length check")),
    (Foreign({}, buffers={"causal_mask": torch.ones(1, 1, 64, 64, dtype=torch.bool)}), TOKENIZER,
     (64, "buffer causal_mask [1, 1, 64, 64]")),
    (Foreign({}), SimpleNamespace(model_max_length=2048), (2048, "the tokenizer's model_max_length")),
    (Foreign({"max_length": 20, "n_positions": 64}), TOKENIZER, (64, "config key n_positions")),
], ids=["known-key", "unknown-key", "nested-key", "keys-disagree-code-decides", "code-alone", "mask-buffer",
        "tokenizer-alone", "generation-max-length-is-not-the-context"])
def test_context_length_from_whatever_the_checkpoint_has(model, tokenizer, expected) -> None:
    assert context_length(model, model.block, tokenizer, {}) == expected


@pytest.mark.parametrize(("model", "tokenizer", "words"), [
    (Foreign({}), TOKENIZER, "nothing in the checkpoint gives one"),
    (Foreign({"train_seq_len": 128, "ctx_window": 96}), SimpleNamespace(model_max_length=2048),
     "does not settle it: 96 (config key ctx_window); 128 (config key train_seq_len); 2048"),
], ids=["nothing", "disagreement"])
def test_an_unknown_context_length_is_refused_naming_the_flag(model, tokenizer, words: str) -> None:
    with pytest.raises(ImportRefused, match="pass --set max_position_embeddings=N") as err:
        context_length(model, model.block, tokenizer, {})
    assert words in str(err.value)
    assert context_length(model, model.block, tokenizer, {"max_position_embeddings": 77}) == (
        77, "--set")


def test_overrides_are_config_fields_read_as_json() -> None:
    assert parse_overrides(["max_position_embeddings=2048", "norm_eps=1e-6", "hidden_act=gelu_tanh",
                            "lm_head_bias=true"]) == {"max_position_embeddings": 2048, "norm_eps": 1e-6,
                                                      "hidden_act": "gelu_tanh", "lm_head_bias": True}
    with pytest.raises(ImportRefused, match="--set context=2048: expected FIELD=VALUE with FIELD one of"):
        parse_overrides(["context=2048"])
