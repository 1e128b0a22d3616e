"""The binary code: K, range checks, GF(2) algebra, and exact round trips over the paper's whole vocabulary."""

from __future__ import annotations

import itertools

import pytest
import torch
from support.checkpoints import scrambled_lift_map

from fmbc_serve.binary_code import (
    BIT_ORDERS,
    CODE_VALUES,
    LIFT_LAYOUTS,
    BinaryCode,
    code_bits,
    gf2_inverse,
    random_affine,
)

PAPER_V = 65536


def lift_map_for(layout: str, width: int) -> tuple[int, ...] | None:
    """The paper vocabulary's 16 bits under a scrambled map, for layout `map`."""
    return scrambled_lift_map(16, width) if layout == "map" else None


@pytest.mark.parametrize(("vocab", "bits"), [(2, 1), (3, 2), (4, 2), (5, 3), (512, 9), (8192, 13), (50257, 16),
                                             (65536, 16), (65537, 17), (1 << 24, 24)])
def test_code_bits_is_ceil_log2(vocab: int, bits: int) -> None:
    assert code_bits(vocab) == bits


@pytest.mark.parametrize("vocab", [0, 1, -5, 2.0])
def test_code_bits_rejects_degenerate_vocab(vocab) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        code_bits(vocab)


@pytest.mark.parametrize(("order", "values", "layout"),
                         list(itertools.product(BIT_ORDERS, CODE_VALUES, LIFT_LAYOUTS)))
@pytest.mark.parametrize("affine_seed", [None, 0, 1])
def test_round_trip_all_paper_ids(order: str, values: str, layout: str, affine_seed: int | None) -> None:
    rows, bias = random_affine(16, affine_seed) if affine_seed is not None else (None, 0)
    code = BinaryCode(PAPER_V, 64, order, values, 0.5 if values == "sign" else 1.0, layout,
                      None if rows is None else tuple(rows), bias, lift_map_for(layout, 64))
    ids = torch.arange(PAPER_V)
    lifted = code.embed(ids)
    assert lifted.shape == (PAPER_V, 64)
    assert torch.equal(lifted, code.lift(code.encode(ids)))  # the one-step engine maths = the definition
    assert torch.equal(code.decode(lifted), ids)


def test_round_trip_all_paper_ids_at_paper_width() -> None:
    code = BinaryCode(PAPER_V, 1024)  # the paper's shape: 16 bits -> 1024
    for chunk in torch.arange(PAPER_V).split(16384):
        assert torch.equal(code.decode(code.embed(chunk, torch.bfloat16)), chunk)


@pytest.mark.parametrize("width", [16, 17, 100, 1000])
@pytest.mark.parametrize("layout", LIFT_LAYOUTS)
def test_round_trip_widths_not_divisible_by_k(width: int, layout: str) -> None:
    try:
        code = BinaryCode(PAPER_V, width, layout=layout, lift_map=lift_map_for(layout, width))
    except ValueError as err:  # interleave into 17 = 16 bits x 2 copies would cut off bits 9..15
        assert layout == "interleave" and "truncates away" in str(err)
        return
    ids = torch.arange(PAPER_V)
    assert torch.equal(code.decode(code.embed(ids, torch.bfloat16)), ids)


def test_lift_layouts_match_their_definition() -> None:
    code = BinaryCode(16, 10, bit_order="lsb", layout="repeat")  # K = 4
    assert code.embed(torch.tensor(0b0011)).tolist() == [1, 1, 0, 0, 1, 1, 0, 0, 1, 1]
    code = BinaryCode(16, 10, bit_order="msb", layout="interleave")  # each bit 3 times, truncated to 10
    assert code.embed(torch.tensor(0b0011)).tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    code = BinaryCode(16, 4, values="sign", scale=2.0)
    assert code.embed(torch.tensor(0b0101)).tolist() == [2, -2, 2, -2]
    code = BinaryCode(16, 6, layout="map", lift_map=(3, 0, 0, 2, 1, 3))  # any fixed map that uses every bit
    assert code.embed(torch.tensor(0b1001)).tolist() == [1, 1, 1, 0, 0, 1]
    code = BinaryCode(16, 4, values="zero_one", scale=-0.5)  # a negative scale: a 1 bit takes -0.5
    assert code.embed(torch.tensor(0b0011)).tolist() == [-0.5, -0.5, 0, 0]
    assert code.decode(code.embed(torch.arange(16))).tolist() == list(range(16))


@pytest.mark.parametrize(("options", "message"), [
    ({"layout": "map"}, "lift_map is required"),
    ({"lift_map": (0, 1, 2, 3)}, "only used with it"),
    ({"layout": "map", "lift_map": (0, 1, 2)}, "must hold width = 4"),
    ({"layout": "map", "lift_map": (0, 1, 2, 4)}, "must hold width = 4"),
    ({"layout": "map", "lift_map": (0, 1, 2, 2)}, r"never uses code position\(s\) \[3\]"),
    ({"scale": float("inf")}, "finite non-zero"),
])
def test_bad_lift_maps_and_scales_are_rejected(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BinaryCode(16, 4, **options)


@pytest.mark.parametrize("bad", [PAPER_V, -1, 1 << 40])
def test_out_of_range_ids_are_rejected(bad: int) -> None:
    code = BinaryCode(PAPER_V, 1024)
    with pytest.raises(ValueError, match=f"token id {bad} is out of vocabulary"):
        code.embed(torch.tensor([3, bad]))


def test_ids_in_unused_codes_are_rejected() -> None:
    """V = 50257 needs 16 bits; ids in [V, 2^16) have a code but no token: they must not alias silently."""
    code = BinaryCode(50257, 64)
    with pytest.raises(ValueError, match="out of vocabulary"):
        code.embed(torch.tensor([50257]))
    with pytest.raises(TypeError):
        code.embed(torch.tensor([1.0]))


def test_decode_rejects_non_codes() -> None:
    code = BinaryCode(50257, 64, layout="repeat")
    lifted = code.embed(torch.tensor([7]))
    lifted[0, 20] = 1 - lifted[0, 20]  # one copy of bit 4 disagrees with the others
    with pytest.raises(ValueError, match="copies of one bit disagree"):
        code.decode(lifted)
    with pytest.raises(ValueError, match="outside"):
        code.decode(BinaryCode(65536, 64, layout="repeat").embed(torch.tensor([65535])))


def test_gf2_inverse_and_singular_matrices() -> None:
    rows, _ = random_affine(16, 3)
    inverse = gf2_inverse(rows, 16)
    code = BinaryCode(PAPER_V, 16, affine_rows=tuple(rows))
    x = torch.arange(PAPER_V)
    assert torch.equal(code.unrecode(code.recode(x)), x)
    assert sorted(code.recode(x).tolist()) == x.tolist()  # a bijection of [0, 2^K)
    assert gf2_inverse(inverse, 16) == rows
    with pytest.raises(ValueError, match="singular"):
        gf2_inverse([0b01, 0b01], 2)
    with pytest.raises(ValueError, match="singular"):
        BinaryCode(4, 2, affine_rows=(0b11, 0b11), affine_bias=1)
    with pytest.raises(ValueError, match="rows"):
        gf2_inverse([1], 2)


def test_random_affine_is_seeded() -> None:
    assert random_affine(16, 7) == random_affine(16, 7)
    assert random_affine(16, 7) != random_affine(16, 8)
    rows, bias = random_affine(24, 0)
    assert len(rows) == 24 and 0 <= bias < 1 << 24


def test_affine_is_c_prime_equals_a_c_xor_b() -> None:
    code = BinaryCode(8, 3, affine_rows=(0b011, 0b110, 0b100), affine_bias=0b101)  # rows i: c'_i = <A_i, c>
    c = 0b110  # c0=0 c1=1 c2=1
    expected_bits = [(0 ^ 1) ^ 1, (1 ^ 1) ^ 0, 1 ^ 1]  # parity(A_i & c) ^ b_i
    assert code.recode(torch.tensor(c)).item() == sum(b << i for i, b in enumerate(expected_bits))
