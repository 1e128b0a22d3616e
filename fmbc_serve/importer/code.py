"""The input code, solved from what the foreign model's first block receives for every id.

A stored table, a frozen embedding and a code computed in `forward` look the same from there: a [V, d] table.
`solve_code` finds the config fields (bit order, values and scale, lift, an affine recode over GF(2)) that
reproduce it exactly, imports a table that is no code as `learned`, and refuses a code damaged in a few rows.
"""

from __future__ import annotations

import itertools

import torch

from ..binary_code import BinaryCode, CodeError, bit_parity, code_bits, gf2_inverse
from .errors import ImportRefused, format_ids


def solve_code(table: torch.Tensor) -> tuple[dict, str]:
    """Config fields of the input (`input_mode` and code fields) that reproduce `table` [V, d] exactly, and a
    one-line note of how. Raises ImportRefused for a code damaged in a few rows."""
    vocab, width = table.shape
    values, counts = table.unique(return_counts=True)
    if values.numel() > 2:
        two = values[counts.topk(2).indices]
        in_two = (table == two[0]) | (table == two[1])
        if in_two.float().mean() < 0.99:
            return {"input_mode": "learned"}, "not a two-valued table: imported as a learned table"
        bad = (~in_two).any(1).nonzero().flatten().tolist()
        raise ImportRefused(f"the input table is a two-valued binary code except at id(s) {format_ids(bad)} "
                            f"({len(bad)} of {vocab} rows hold other values): refusing a damaged code")
    if values.numel() < 2:
        return {"input_mode": "learned"}, "every id has the same input: imported as a learned table"
    low, high = float(values[0]), float(values[1])
    if low == 0 or high == 0:
        choices = [("zero_one", high if low == 0 else low)]
    elif low == -high:
        choices = [("sign", high), ("sign", low)]
    else:
        return {"input_mode": "learned"}, (f"two-valued code with values {{{low:g}, {high:g}}}, neither {{0, s}} "
                                           "nor {-s, s}: imported as a learned table (exact)")
    best = None
    for kind, scale in choices:
        bits = table == scale  # a 1 bit takes the value `scale`
        solved = solve_columns(bits)
        if best is None or solved[2] < best[2][2] or (solved[2] == best[2][2] and solved[0] < best[2][0]):
            best = (kind, scale, solved)
    kind, scale, (affine_cost, functions, bad_ids) = best
    if bad_ids:
        if len(bad_ids) <= max(1, vocab // 100):
            raise ImportRefused(f"the input table is a binary code except at id(s) {format_ids(bad_ids)}, whose rows "
                                "follow no code the other ids share: refusing a damaged code")
        return {"input_mode": "learned"}, "two-valued, but no affine function of the id bits: imported as learned"
    return code_fields(vocab, width, kind, scale, functions, table)


def solve_columns(bits: torch.Tensor) -> tuple[int, list[tuple[int, int]], list[int]]:
    """Each width column as an affine function of the id bits, (mask a, offset b): bit = parity(a & id) ⊕ b.

    Fitted from an anchor id r and its K one-bit neighbours; several anchors are tried per column and the
    one that explains the most ids kept, so one damaged row cannot hide behind a bad anchor. Returns (how many
    columns are not plain bits, the functions, the ids some column does not explain)."""
    vocab, width = bits.shape
    k = code_bits(vocab)
    ids = torch.arange(vocab)
    reach = min(1 << (k - 1), max(1, vocab - (1 << (k - 1))))  # anchors whose one-bit neighbours are all < V
    anchors = sorted({0, *torch.randint(0, reach, (3,), generator=torch.Generator().manual_seed(0)).tolist()})
    observed = bits.long()
    best_masks = best_offsets = best_wrong = None
    for r in anchors:
        flips = torch.stack([observed[r ^ (1 << j)] ^ observed[r] for j in range(k)])  # [K, d]
        masks = (flips << torch.arange(k).unsqueeze(1)).sum(0)  # [d]
        offsets = observed[r] ^ bit_parity(masks & r)
        predicted = bit_parity(ids.unsqueeze(1) & masks) ^ offsets
        wrong = (predicted != observed).sum(0)  # per column
        if best_wrong is None:
            best_masks, best_offsets, best_wrong = masks, offsets, wrong
        else:
            better = wrong < best_wrong
            best_masks = torch.where(better, masks, best_masks)
            best_offsets = torch.where(better, offsets, best_offsets)
            best_wrong = torch.minimum(wrong, best_wrong)
    predicted = bit_parity(ids.unsqueeze(1) & best_masks) ^ best_offsets
    bad_ids = (predicted != observed).any(1).nonzero().flatten().tolist()
    functions = list(zip(best_masks.tolist(), best_offsets.tolist(), strict=True))
    affine_cost = sum(1 for a, b in functions if b or a & (a - 1))
    return affine_cost, functions, bad_ids


def code_fields(vocab: int, width: int, kind: str, scale: float, functions: list[tuple[int, int]],
                 table: torch.Tensor) -> tuple[dict, str]:
    """Config fields for columns that are affine functions (a, b) of the id bits, checked against `table`."""
    k = code_bits(vocab)
    distinct = list(dict.fromkeys(functions))
    plain = all(b == 0 and a and not a & (a - 1) for a, b in distinct)
    if plain:
        rows = [1 << i for i in range(k)]
        bias = 0
    else:
        if len(distinct) != k:
            return {"input_mode": "learned"}, (f"columns are {len(distinct)} distinct affine functions of the id "
                                               f"bits, not K = {k}: imported as a learned table (exact)")
        rows = [a for a, _ in distinct]
        bias = sum(b << i for i, (_, b) in enumerate(distinct))
        try:
            gf2_inverse(rows, k)
        except CodeError:
            return {"input_mode": "learned"}, "columns form a singular affine map: imported as a learned table"
    index = {(a, b): i for i, (a, b) in enumerate(zip(rows, [(bias >> i) & 1 for i in range(k)], strict=True))}
    if any(f not in index for f in functions):
        return {"input_mode": "learned"}, "columns do not cover all K code bits: imported as a learned table"
    width_bits = [index[f] for f in functions]
    base = {"values": kind, "scale": scale}
    if not plain:
        base.update(affine_rows=tuple(rows), affine_bias=bias)
    code = standard_layout(vocab, width, width_bits, base, reorder=not plain)
    if code is None:
        try:
            code = BinaryCode(vocab, width, bit_order="lsb", layout="map", lift_map=tuple(width_bits), **base)
        except CodeError as err:
            return {"input_mode": "learned"}, f"no K-bit code reproduces the table ({err}): imported as learned"
    if not torch.equal(code.embed(torch.arange(vocab)), table):
        raise ImportRefused("internal: the solved code does not reproduce the observed input table")
    fields = {"input_mode": "affine" if code.affine_rows else "binary", "code_bit_order": code.bit_order,
              "code_values": code.values, "code_scale": code.scale, "code_layout": code.layout}
    if code.affine_rows:
        fields.update(affine_rows=list(code.affine_rows), affine_bias=code.affine_bias)
    if code.lift_map:
        fields["code_lift_map"] = list(code.lift_map)
    return fields, "solved from the observed inputs of all ids"


def standard_layout(vocab: int, width: int, width_bits: list[int], base: dict, reorder: bool) -> BinaryCode | None:
    """The same code as `repeat`/`interleave` in `lsb`/`msb` order, if one matches (reordering A's rows and
    b's bits to the layout's bit positions when there is an affine map)."""
    for order, layout in itertools.product(("lsb", "msb"), ("interleave", "repeat")):
        try:
            standard = BinaryCode(vocab, width, bit_order=order, layout=layout, values=base["values"],
                                  scale=base["scale"]).width_bits().tolist()
        except CodeError:
            continue
        pairing = dict(zip(width_bits, standard, strict=True))  # our bit -> the layout's bit
        if len(pairing) != len(set(pairing.values())) or any(pairing[w] != s for w, s in
                                                               zip(width_bits, standard, strict=True)):
            continue
        if not reorder:
            if all(w == s for w, s in pairing.items()):
                return BinaryCode(vocab, width, bit_order=order, layout=layout, **base)
            continue
        rows, bias = [0] * len(pairing), 0
        for ours, theirs in pairing.items():
            rows[theirs] = base["affine_rows"][ours]
            bias |= ((base["affine_bias"] >> ours) & 1) << theirs
        return BinaryCode(vocab, width, bit_order=order, layout=layout, values=base["values"], scale=base["scale"],
                          affine_rows=tuple(rows), affine_bias=bias)
    return None
