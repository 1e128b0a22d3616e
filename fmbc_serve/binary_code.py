"""The fixed minimal binary token code: the single source of truth.

A token id in [0, V) is written as its K = ceil(log2 V) bits, optionally recoded by an invertible affine map
over GF(2) (c' = A·c ⊕ b), laid out in `lsb` or `msb` order, mapped to values {0, 1} or {-1, +1} times a
scale, and lifted to the model width d with no parameters by tiling the whole code (`repeat`) or repeating
each bit (`interleave`), truncated to d. Every engine path (reference model, vLLM, SGLang, Triton kernel)
calls this module or is tested against it.

Conventions (also in docs/format.md):
- Bit j of an integer x is (x >> j) & 1. The affine map acts on that vector: row i of A is a K-bit mask and
  c'_i = parity(A_i & c) ⊕ b_i, so c' is again an integer in [0, 2^K).
- `lsb`: code position i holds bit i of c'. `msb`: position i holds bit K-1-i.
- `repeat`: width position p holds code position p mod K. `interleave`: p holds code position p // r with
  r = ceil(d / K); every code position must occur at least once (checked).

This file imports only torch and the standard library: it is copied into checkpoint folders so that they
load with `trust_remote_code=True` where fmbc_serve is not installed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

BIT_ORDERS = ("lsb", "msb")
CODE_VALUES = ("zero_one", "sign")
LIFT_LAYOUTS = ("repeat", "interleave")


def code_bits(vocab_size: int) -> int:
    """K = ceil(log2 V): the fewest bits that give every id in [0, V) its own code."""
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    return (vocab_size - 1).bit_length()


def gf2_inverse(rows: list[int], num_bits: int) -> list[int]:
    """Invert a K×K bit matrix over GF(2) by Gauss-Jordan elimination.

    `rows[i]` is row i as a bitmask (bit j = column j). Raises ValueError if the matrix is singular.
    """
    if len(rows) != num_bits:
        raise ValueError(f"affine matrix must have {num_bits} rows, got {len(rows)}")
    full = (1 << num_bits) - 1
    for i, row in enumerate(rows):
        if not isinstance(row, int) or row < 0 or row > full:
            raise ValueError(f"affine matrix row {i} must be an integer in [0, 2^{num_bits}), got {row!r}")
    work = list(rows)
    inverse = [1 << i for i in range(num_bits)]
    for col in range(num_bits):
        pivot = next((r for r in range(col, num_bits) if (work[r] >> col) & 1), None)
        if pivot is None:
            raise ValueError(f"affine matrix is singular over GF(2) (no pivot in column {col})")
        work[col], work[pivot] = work[pivot], work[col]
        inverse[col], inverse[pivot] = inverse[pivot], inverse[col]
        for r in range(num_bits):
            if r != col and (work[r] >> col) & 1:
                work[r] ^= work[col]
                inverse[r] ^= inverse[col]
    return inverse


def random_affine(num_bits: int, seed: int) -> tuple[list[int], int]:
    """A random invertible A (as K row bitmasks) and a random K-bit b, reproducible from `seed`.

    Draws each row uniformly from [1, 2^K) with Python's `random.Random(seed)` and redraws the whole matrix
    until it is invertible (probability ≈ 0.29 per draw), then draws b uniformly from [0, 2^K).
    """
    rng = random.Random(seed)
    while True:
        rows = [rng.randrange(1, 1 << num_bits) for _ in range(num_bits)]
        try:
            gf2_inverse(rows, num_bits)
        except ValueError:
            continue
        return rows, rng.randrange(0, 1 << num_bits)


def _bit_matrix(rows: list[int], num_bits: int) -> torch.Tensor:
    """Row bitmasks as a dense K×K int64 0/1 matrix."""
    return torch.tensor([[(row >> j) & 1 for j in range(num_bits)] for row in rows], dtype=torch.int64)


@dataclass(frozen=True)
class BinaryCode:
    """One concrete code: everything needed to go from token ids to the lifted input and back."""

    vocab_size: int
    width: int
    bit_order: str = "lsb"
    values: str = "zero_one"
    scale: float = 1.0
    layout: str = "interleave"
    affine_rows: tuple[int, ...] | None = None
    affine_bias: int = 0

    def __post_init__(self) -> None:
        k = code_bits(self.vocab_size)
        if self.bit_order not in BIT_ORDERS:
            raise ValueError(f"bit_order must be one of {BIT_ORDERS}, got {self.bit_order!r}")
        if self.values not in CODE_VALUES:
            raise ValueError(f"values must be one of {CODE_VALUES}, got {self.values!r}")
        if self.layout not in LIFT_LAYOUTS:
            raise ValueError(f"layout must be one of {LIFT_LAYOUTS}, got {self.layout!r}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale!r}")
        if not isinstance(self.width, int) or self.width < k:
            raise ValueError(f"width must be an integer >= K = {k} (every bit must reach the model), "
                             f"got {self.width!r}")
        if self.layout == "interleave" and (k - 1) * _ceil_div(self.width, k) >= self.width:
            raise ValueError(f"interleave layout of K = {k} bits into width {self.width} truncates away the last "
                             f"bit (each bit repeated ceil(width/K) = {_ceil_div(self.width, k)} times); "
                             "use layout='repeat' or another width")
        if self.affine_rows is not None:
            gf2_inverse(list(self.affine_rows), k)  # validates shape, range and invertibility
            if not isinstance(self.affine_bias, int) or not 0 <= self.affine_bias < (1 << k):
                raise ValueError(f"affine_bias must be an integer in [0, 2^{k}), got {self.affine_bias!r}")
        elif self.affine_bias:
            raise ValueError("affine_bias is set but affine_rows is not")

    @property
    def num_bits(self) -> int:
        return code_bits(self.vocab_size)

    @property
    def low_value(self) -> float:
        """The value a 0 bit takes in the lifted code."""
        return 0.0 if self.values == "zero_one" else -self.scale

    @property
    def high_value(self) -> float:
        """The value a 1 bit takes in the lifted code."""
        return self.scale

    def check_ids(self, ids: torch.Tensor) -> None:
        """Raise ValueError if any id lies outside [0, V): such ids must never alias onto a real token."""
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is out of range [0, {self.vocab_size})")

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The code as three small int64 tensors for `embed_code`: bit shifts [K], the bit of c' each width
        position holds [d], and A as a 0/1 matrix [K, K] (None without an affine map). Engines keep them as
        buffers on their device, so the hot path is pure tensor maths (traceable, CUDA-graph safe)."""
        matrix = None if self.affine_rows is None else _bit_matrix(list(self.affine_rows), self.num_bits)
        return torch.arange(self.num_bits, dtype=torch.int64), self.width_bits(), matrix

    def recode(self, ids: torch.Tensor) -> torch.Tensor:
        """c' = A·c ⊕ b as integers (the identity without an affine map)."""
        if self.affine_rows is None:
            return ids.long()
        shifts = torch.arange(self.num_bits, device=ids.device)
        return affine_recode(ids.long(), shifts, _bit_matrix(list(self.affine_rows), self.num_bits).to(ids.device),
                             self.affine_bias)

    def unrecode(self, codes: torch.Tensor) -> torch.Tensor:
        """The inverse of `recode`: c = A⁻¹·(c' ⊕ b)."""
        if self.affine_rows is None:
            return codes.long()
        inverse = _bit_matrix(gf2_inverse(list(self.affine_rows), self.num_bits), self.num_bits)
        shifts = torch.arange(self.num_bits, device=codes.device)
        return affine_recode(codes.long() ^ self.affine_bias, shifts, inverse.to(codes.device), 0)

    def code_positions(self) -> torch.Tensor:
        """For each code position i, which bit of c' it holds: shape [K]."""
        k = self.num_bits
        order = torch.arange(k, dtype=torch.int64)
        return order if self.bit_order == "lsb" else k - 1 - order

    def width_positions(self) -> torch.Tensor:
        """For each model-width position p, which code position it copies: shape [d]."""
        p = torch.arange(self.width, dtype=torch.int64)
        if self.layout == "repeat":
            return p % self.num_bits
        return p // _ceil_div(self.width, self.num_bits)

    def width_bits(self) -> torch.Tensor:
        """For each model-width position p, which bit of c' it holds: shape [d]. (What a kernel needs.)"""
        return self.code_positions()[self.width_positions()]

    def encode(self, ids: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Token ids [...] -> code bits [..., K] (int64 0/1) in code-position order."""
        if check:
            self.check_ids(ids)
        shifts = self.code_positions().to(ids.device)
        return (self.recode(ids).unsqueeze(-1) >> shifts) & 1

    def lift(self, bits: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Code bits [..., K] -> the model input [..., d]: values, scale and layout applied."""
        spread = bits[..., self.width_positions().to(bits.device)]
        low, high = self.low_value, self.high_value
        return (spread.to(torch.float32) * (high - low) + low).to(dtype)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32, check: bool = True) -> torch.Tensor:
        """Token ids [...] -> model input [..., d]: what replaces the embedding table lookup.

        Equal to `lift(encode(ids))` (tested), computed in one step from `tables()`."""
        if check:
            self.check_ids(ids)
        shifts, width_bits, matrix = (None if t is None else t.to(ids.device) for t in self.tables())
        return embed_code(ids, shifts, width_bits, matrix, self.affine_bias, self.low_value, self.high_value, dtype)

    def decode(self, lifted: torch.Tensor) -> torch.Tensor:
        """The exact inverse of `embed`: model input [..., d] -> token ids [...].

        Reads the first copy of each bit, then raises ValueError unless re-lifting those bits gives back the
        input exactly and the id is below V, so a passing round trip proves injectivity.
        """
        if lifted.shape[-1] != self.width:
            raise ValueError(f"expected last dimension {self.width}, got {lifted.shape[-1]}")
        high = torch.tensor(self.high_value, dtype=torch.float32).to(lifted.dtype)
        positions = self.width_positions().to(lifted.device)
        first_copy = positions.unsqueeze(0) == torch.arange(self.num_bits, device=lifted.device).unsqueeze(1)
        bits = (lifted[..., first_copy.int().argmax(dim=1)] == high).long()
        if not torch.equal(self.lift(bits, lifted.dtype), lifted):
            raise ValueError("not a lifted code: a value is neither of the code's two values, "
                             "or copies of one bit disagree")
        shifts = self.code_positions().to(lifted.device)
        ids = self.unrecode((bits << shifts).sum(-1))
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"lifted code decodes to id {int(ids.max())}, outside [0, {self.vocab_size})")
        return ids


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def affine_recode(ids: torch.Tensor, shifts: torch.Tensor, matrix: torch.Tensor, bias: int) -> torch.Tensor:
    """c'_i = parity(A_i & c) ⊕ b_i for int64 ids, with A as a 0/1 matrix [K, K] and shifts = arange(K)."""
    bits_in = (ids.unsqueeze(-1) >> shifts) & 1  # [..., K(in)]
    bits_out = (bits_in.unsqueeze(-2) & matrix).sum(-1) & 1  # [..., K(out)]
    return (bits_out << shifts).sum(-1) ^ bias


def embed_code(
    ids: torch.Tensor,
    shifts: torch.Tensor,
    width_bits: torch.Tensor,
    matrix: torch.Tensor | None,
    bias: int,
    low: float,
    high: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The lifted code from `BinaryCode.tables()`: the one implementation of the forward maths, shared by the
    reference model and the engine classes. Does no range check (callers validate ids first)."""
    codes = ids.long() if matrix is None else affine_recode(ids.long(), shifts, matrix, bias)
    bits = (codes.unsqueeze(-1) >> width_bits) & 1  # [..., d]
    return (bits.to(torch.float32) * (high - low) + low).to(dtype)


class FixedCodeInput(nn.Module):
    """Token ids -> lifted code: the module that replaces the V×d embedding table. It has no parameters; the
    code's small tables are non-persistent buffers, so they follow the model's device and never reach a
    checkpoint. Used by the reference model and by the engine classes."""

    def __init__(self, code: BinaryCode) -> None:
        super().__init__()
        self.code = code
        shifts, width_bits, matrix = code.tables()
        self.register_buffer("shifts", shifts, persistent=False)
        self.register_buffer("width_bits", width_bits, persistent=False)
        self.register_buffer("affine_matrix", matrix, persistent=False)

    def forward(self, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """No range check here (it would force a device sync): callers validate ids at their boundary."""
        return embed_code(input_ids, self.shifts, self.width_bits, self.affine_matrix, self.code.affine_bias,
                          self.code.low_value, self.code.high_value, dtype)
