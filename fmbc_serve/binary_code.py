"""The fixed minimal binary token code: the single source of truth.

A token id in [0, V) is written as its K = ceil(log2 V) bits, optionally recoded by an invertible affine map
over GF(2) (c' = A·c ⊕ b), laid out in `lsb` or `msb` order, mapped to values {0, 1} or {-1, +1} times a
scale, and lifted to the model width d with no parameters by tiling the whole code (`repeat`), repeating
each bit (`interleave`), truncated to d, or by an explicit per-position map (`map`, e.g. found by `fmbc import`
in a foreign checkpoint). Every engine path (reference model, vLLM, SGLang, Triton kernel)
calls this module or is tested against it.

Conventions (also in docs/format.md):
- Bit j of an integer x is (x >> j) & 1. The affine map acts on that vector: row i of A is a K-bit mask and
  c'_i = parity(A_i & c) ⊕ b_i, so c' is again an integer in [0, 2^K).
- `lsb`: code position i holds bit i of c'. `msb`: position i holds bit K-1-i.
- `repeat`: width position p holds code position p mod K. `interleave`: p holds code position p // r with
  r = ceil(d / K). `map`: p holds code position lift_map[p]. Every code position must occur at least once
  (checked), or two ids would share an input.
- The two values are {0, s} (`zero_one`) or {-s, +s} (`sign`); s may be negative (a 1 bit then takes the
  negative value), so a foreign code whose bits are stored flipped needs no affine map.

This file imports only torch and the standard library: it is copied into checkpoint folders so that they
load with `trust_remote_code=True` where fmbc_serve is not installed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

BIT_ORDERS = ("lsb", "msb")
CODE_VALUES = ("zero_one", "sign")
LIFT_LAYOUTS = ("repeat", "interleave", "map")


class CodeError(ValueError):
    """An invalid code option. `field` names the BinaryCode field at fault, so a config can report the error
    under its own field name without reading the message."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class CodeTables(NamedTuple):
    """A code as three small int64 tensors: the one format read by the torch path (`embed_code`) and the
    Triton kernel. Engines keep them as buffers on their device, so the hot path is pure tensor maths
    (traceable, CUDA-graph safe)."""

    width_bits: torch.Tensor  # [d]: which bit of c' each width position holds
    bit_counts: torch.Tensor  # [K]: how many width positions hold each bit (the kernel's closed-form statistics)
    affine_rows: torch.Tensor  # [K]: A's rows as bitmasks, or [0] without an affine map

    def to(self, device: torch.device | str) -> CodeTables:
        """The same tables on `device`."""
        return CodeTables(*(table.to(device) for table in self))


def code_bits(vocab_size: int) -> int:
    """K = ceil(log2 V): the fewest bits that give every id in [0, V) its own code."""
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise CodeError("vocab_size", f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    return (vocab_size - 1).bit_length()


def gf2_inverse(rows: list[int], num_bits: int) -> list[int]:
    """Invert a K×K bit matrix over GF(2) by Gauss-Jordan elimination.

    `rows[i]` is row i as a bitmask (bit j = column j). Raises CodeError (field `affine_rows`) if the matrix
    is malformed or singular.
    """
    if len(rows) != num_bits:
        raise CodeError("affine_rows", f"affine matrix must have {num_bits} rows, got {len(rows)}")
    full = (1 << num_bits) - 1
    for i, row in enumerate(rows):
        if not isinstance(row, int) or row < 0 or row > full:
            raise CodeError("affine_rows",
                            f"affine matrix row {i} must be an integer in [0, 2^{num_bits}), got {row!r}")
    work = list(rows)
    inverse = [1 << i for i in range(num_bits)]
    for col in range(num_bits):
        pivot = next((r for r in range(col, num_bits) if (work[r] >> col) & 1), None)
        if pivot is None:
            raise CodeError("affine_rows", f"affine matrix is singular over GF(2) (no pivot in column {col})")
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
    lift_map: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        k = code_bits(self.vocab_size)
        check_code_options(self.bit_order, self.values, self.scale, self.layout)
        if not isinstance(self.width, int) or self.width < k:
            raise CodeError("width", f"width must be an integer >= K = {k} (every bit must reach the model), "
                                     f"got {self.width!r}")
        if (self.layout == "map") != (self.lift_map is not None):
            raise CodeError("lift_map", "lift_map is required with layout='map' and only used with it")
        if self.lift_map is not None:
            if len(self.lift_map) != self.width or any(
                    not isinstance(p, int) or not 0 <= p < k for p in self.lift_map):
                raise CodeError("lift_map", f"lift_map must hold width = {self.width} code positions in [0, {k})")
            missing = sorted(set(range(k)) - set(self.lift_map))
            if missing:
                raise CodeError("lift_map", f"lift_map never uses code position(s) {missing}: ids differing only "
                                            "there would share an input")
        if self.layout == "interleave" and (k - 1) * _ceil_div(self.width, k) >= self.width:
            raise CodeError("layout", f"interleave layout of K = {k} bits into width {self.width} truncates away "
                                      f"the last bit (each bit repeated ceil(width/K) = {_ceil_div(self.width, k)} "
                                      "times); use layout='repeat' or another width")
        if self.affine_rows is not None:
            gf2_inverse(list(self.affine_rows), k)  # validates shape, range and invertibility
            if not isinstance(self.affine_bias, int) or not 0 <= self.affine_bias < (1 << k):
                raise CodeError("affine_bias", f"affine_bias must be an integer in [0, 2^{k}), "
                                               f"got {self.affine_bias!r}")
        elif self.affine_bias:
            raise CodeError("affine_bias", "affine_bias is set but affine_rows is not")

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
        check_token_ids(ids, self.vocab_size)

    def tables(self) -> CodeTables:
        """The code's tables (CPU, int64), for `embed_code` and the kernel."""
        width_bits = self.width_bits()
        return CodeTables(
            width_bits=width_bits,
            bit_counts=(width_bits == torch.arange(self.num_bits).unsqueeze(1)).sum(1),
            affine_rows=torch.tensor(self.affine_rows or (), dtype=torch.int64),
        )

    def recode(self, ids: torch.Tensor) -> torch.Tensor:
        """c' = A·c ⊕ b as integers (the identity without an affine map)."""
        if self.affine_rows is None:
            return ids.long()
        return affine_recode(ids.long(), torch.tensor(self.affine_rows, device=ids.device), self.affine_bias)

    def unrecode(self, codes: torch.Tensor) -> torch.Tensor:
        """The inverse of `recode`: c = A⁻¹·(c' ⊕ b)."""
        if self.affine_rows is None:
            return codes.long()
        inverse = torch.tensor(gf2_inverse(list(self.affine_rows), self.num_bits), device=codes.device)
        return affine_recode(codes.long() ^ self.affine_bias, inverse, 0)

    def code_positions(self) -> torch.Tensor:
        """For each code position i, which bit of c' it holds: shape [K]."""
        k = self.num_bits
        order = torch.arange(k, dtype=torch.int64)
        return order if self.bit_order == "lsb" else k - 1 - order

    def width_positions(self) -> torch.Tensor:
        """For each model-width position p, which code position it copies: shape [d]."""
        if self.lift_map is not None:
            return torch.tensor(self.lift_map, dtype=torch.int64)
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
        return embed_code(ids, self.tables().to(ids.device), self.affine_bias, self.low_value, self.high_value,
                          dtype)

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


def check_token_ids(ids: torch.Tensor | Sequence[int], vocab_size: int) -> None:
    """Raise ValueError naming the first id outside [0, V) (TypeError for a non-integer tensor): such an id must
    never alias onto a real token. Takes a tensor (the models) or a list of ints (a request's prompt)."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() == 0:
            return
        lo, hi = int(ids.min()), int(ids.max())
        bad = lo if lo < 0 else hi if hi >= vocab_size else None
    else:
        bad = next((int(i) for i in ids if not 0 <= int(i) < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is out of vocabulary: FMBC token ids must lie in [0, {vocab_size})")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def check_code_options(bit_order: str, values: str, scale: float, layout: str) -> None:
    """The option checks of a code that do not depend on V or d (a learned-mode config checks these alone)."""
    if bit_order not in BIT_ORDERS:
        raise CodeError("bit_order", f"bit_order must be one of {BIT_ORDERS}, got {bit_order!r}")
    if values not in CODE_VALUES:
        raise CodeError("values", f"values must be one of {CODE_VALUES}, got {values!r}")
    if layout not in LIFT_LAYOUTS:
        raise CodeError("layout", f"layout must be one of {LIFT_LAYOUTS}, got {layout!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale != 0):
        raise CodeError("scale", f"scale must be a finite non-zero number, got {scale!r}")


def bit_parity(x: torch.Tensor) -> torch.Tensor:
    """Parity of each non-negative int64 by xor-folding (the kernel does the same on int32)."""
    for shift in (32, 16, 8, 4, 2, 1):
        x = x ^ (x >> shift)
    return x & 1


def affine_recode(ids: torch.Tensor, affine_rows: torch.Tensor, bias: int) -> torch.Tensor:
    """c'_i = parity(A_i & c) ⊕ b_i for int64 ids, with A's rows as bitmasks [K]."""
    shifts = torch.arange(affine_rows.shape[0], device=ids.device)
    return (bit_parity(ids.unsqueeze(-1) & affine_rows) << shifts).sum(-1) ^ bias


def embed_code(ids: torch.Tensor, tables: CodeTables, bias: int, low: float, high: float,
               dtype: torch.dtype) -> torch.Tensor:
    """The lifted code from `CodeTables`: the one implementation of the forward maths, shared by the reference
    model and the engine classes. Does no range check (callers validate ids first)."""
    codes = ids.long() if tables.affine_rows.numel() == 0 else affine_recode(ids.long(), tables.affine_rows, bias)
    bits = (codes.unsqueeze(-1) >> tables.width_bits) & 1  # [..., d]
    return (bits.to(torch.float32) * (high - low) + low).to(dtype)


class FixedCodeInput(nn.Module):
    """Token ids -> lifted code: the module that replaces the V×d embedding table. It has no parameters; the
    code's tables are non-persistent buffers, so they follow the model's device and never reach a
    checkpoint. Used by the reference model and by the engine classes."""

    def __init__(self, code: BinaryCode) -> None:
        super().__init__()
        self.code = code
        # The shape of the table this stands for, under nn.Embedding's names (engines' Transformers backends read them).
        self.num_embeddings, self.embedding_dim = code.vocab_size, code.width
        for name, table in code.tables()._asdict().items():
            self.register_buffer(name, table, persistent=False)

    def reset_tables(self) -> None:
        """Rebuild the buffers from the code (after a meta-device init left them empty)."""
        for name, table in self.code.tables()._asdict().items():
            getattr(self, name).copy_(table)

    def tables(self) -> CodeTables:
        return CodeTables(self.width_bits, self.bit_counts, self.affine_rows)

    def forward(self, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """No range check here (it would force a device sync): callers validate ids at their boundary."""
        return embed_code(input_ids, self.tables(), self.code.affine_bias, self.code.low_value,
                          self.code.high_value, dtype)
