"""`fmbc import`: recognise a foreign checkpoint of the FMBC family, convert it, and prove nothing changed.

Published FMBC checkpoints ship their own modeling code and names we cannot know in advance, so nothing here
trusts a name alone:
- the input code is solved from what the foreign model's first block actually receives for every id (a
  stored table or a code computed in `forward` look the same from there): K, bit order, values and scale, the
  lift (tiled, interleaved or any fixed map) and an affine recode c' = A·c ⊕ b over GF(2); a table that is no
  code becomes `input_mode: learned`, a code damaged in a few rows is refused;
- blocks, norms, projections, MLP, final norm and head are found by module structure and shape (names only
  order q/k/v/o), norms and the activation by probing the modules themselves;
- the attention conventions (head count, fused q/k/v order, rotate-half or interleaved rotary pairs, base and
  rotated fraction) by running the foreign first block and ours on the same input until one candidate matches.
  Interleaved pairs are converted exactly by permuting q/k rows within each head.
The converted checkpoint is accepted only if it reproduces the foreign logits on every id as a one-token input
and on random sequences up to the context length (fp32, max |Δlogit| ≤ 1e-4, identical greedy tokens);
otherwise the import fails, names the first layer whose output diverged and leaves no output behind.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .binary_code import BinaryCode, CodeError, bit_parity, code_bits, gf2_inverse
from .configuration_fmbc import FMBCConfig
from .modeling_fmbc import FMBCDecoderLayer, FMBCForCausalLM, FMBCRotaryEmbedding, causal_mask

TOLERANCE = 1e-4  # max |Δlogit| the proof accepts (fp32)
REPORT_FILE = "import_report.json"
# Config keys foreign code uses for the same quantity (the first one present wins; all are checked by testing).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "block_size", "max_seq_len", "n_ctx", "context_length",
                "seq_length", "max_sequence_length")
HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
THETA_KEYS = ("rope_theta", "rotary_emb_base", "rope_base", "theta", "rotary_base", "base")
FRACTION_KEYS = ("rotary_pct", "partial_rotary_factor", "rotary_emb_fraction", "rope_fraction")
COMMON_THETAS = (10000.0, 500000.0, 1000000.0, 100000.0)
# Last name component -> projection role, for separate q/k/v/o (registration order breaks remaining ties).
ROLE_NAMES = {
    "q": ("q", "q_proj", "wq", "query", "to_q", "q_lin", "w_q"),
    "k": ("k", "k_proj", "wk", "key", "to_k", "k_lin", "w_k"),
    "v": ("v", "v_proj", "wv", "value", "to_v", "v_lin", "w_v"),
    "o": ("o", "o_proj", "wo", "out_proj", "c_proj", "dense", "out", "proj", "to_out", "output", "w_o"),
}


class ImportRefused(ValueError):
    """The source cannot be imported exactly; the message says why (shown as a CLI error, exit status 2)."""


# ---------------------------------------------------------------------------------------------- loading


def load_foreign(src: str, trust_remote_code: bool) -> tuple[nn.Module, object]:
    """The foreign model (fp32, eval) and tokenizer, as `AutoModelForCausalLM` / `AutoTokenizer` load them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_path = Path(src) / "config.json"
    if Path(src).is_dir():
        if not config_path.is_file():
            raise ImportRefused(f"{src} has no config.json: not a Hugging Face checkpoint folder")
        raw = json.loads(config_path.read_text())
        if raw.get("model_type") == FMBCConfig.model_type:
            raise ImportRefused(f"{src} is already an fmbc-serve checkpoint: serve it directly (fmbc serve {src})")
        if raw.get("auto_map") and not trust_remote_code:
            files = sorted({ref.split(".")[0] + ".py" for ref in _auto_map_refs(raw["auto_map"])})
            raise ImportRefused(
                f"{src} ships its own model code ({', '.join(files)}); importing must run it, to observe the "
                "input code its first block receives and to prove the conversion against it. Read that code, "
                "then pass --trust-remote-code to allow it")
    try:
        model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=trust_remote_code, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 (foreign code can raise anything; the user needs its message)
        raise ImportRefused(f"{src} does not load with transformers (trust_remote_code={trust_remote_code}): "
                            f"{type(err).__name__}: {err}") from err
    return model.float().eval(), tokenizer


def _auto_map_refs(auto_map: dict) -> Iterator[str]:
    for ref in auto_map.values():
        yield from ([ref] if isinstance(ref, str) else [r for r in ref if r])


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T', V] of a causal LM called as `model(ids)`: HF outputs, (logits, ...) tuples or a tensor.
    Models that return only the last position's logits (nanoGPT) give T' = 1."""
    out = model(ids)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------- structure


def matrix(module: nn.Module) -> torch.Tensor:
    """A projection's weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    weight = module.weight
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def _own_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return list(module.named_parameters(recurse=False))


def is_projection(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


def is_norm(module: nn.Module, width: int) -> bool:
    params = _own_params(module)
    return bool(params) and all(p.dim() == 1 and p.shape[0] == width for _, p in params) and len(params) <= 2


def norm_tensors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, shift) of a norm module, whatever its parameter names (weight/scale/gamma/g, bias/beta/b)."""
    params = dict(_own_params(module))
    shift_name = next((n for n in params if n in ("bias", "beta", "b", "shift")), None)
    scale_name = next(n for n in params if n != shift_name)
    return params[scale_name], params.get(shift_name) if shift_name else None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder stack: the ModuleList of identically-typed modules holding the most parameters."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size and (best is None or size > best[0]):
                best = (size, name, module)
    if best is None:
        raise ImportRefused("no decoder stack found (no ModuleList of identical blocks with parameters)")
    return best[1], best[2]


@dataclass
class BlockLayout:
    """Where one block keeps each part, as module names relative to the block."""

    attn_norm: str
    mlp_norm: str
    qkv: tuple[str, ...]  # one fused projection, or q, k, v
    out: str
    up: str
    down: str


def block_layout(block: nn.Module, width: int) -> BlockLayout:
    """Find a block's norms and projections from shapes; names only order separate q/k/v/o."""
    norms = [n for n, m in block.named_modules() if n and is_norm(m, width)]
    projections = {n: tuple(matrix(m).shape) for n, m in block.named_modules() if n and is_projection(m)}
    if len(norms) != 2:
        raise ImportRefused(f"a block has {len(norms)} width-sized norms ({norms}); an FMBC block has two "
                            "(before attention, before the MLP)")
    downs = [n for n, (rows, cols) in projections.items() if rows == width and cols != width]
    if len(downs) != 1:
        raise ImportRefused(f"cannot find the MLP down projection ([{width}, inner]) among {projections}")
    inner = projections[downs[0]][1]
    mlp_parent = downs[0].rpartition(".")[0]
    ups = [n for n, shape in projections.items() if shape == (inner, width) and n.rpartition(".")[0] == mlp_parent]
    fused = [n for n, shape in projections.items() if shape == (3 * width, width) and n not in ups]
    squares = [n for n, shape in projections.items() if shape == (width, width)]
    if len(ups) != 1 or len(projections) != (2 + (2 if fused else 4)) or len(fused) > 1:
        raise ImportRefused(f"block projections {projections} are not an FMBC block's (q/k/v or fused qkv, "
                            "output, MLP up and down; a gated MLP is not of this family)")
    if fused:
        if len(squares) != 1:
            raise ImportRefused(f"expected one output projection beside the fused {fused[0]}, found {squares}")
        return BlockLayout(norms[0], norms[1], (fused[0],), squares[0], ups[0], downs[0])
    roles = _assign_roles(squares)
    return BlockLayout(norms[0], norms[1], (roles["q"], roles["k"], roles["v"]), roles["o"], ups[0], downs[0])


def _assign_roles(names: list[str]) -> dict[str, str]:
    """q/k/v/o for four square projections: by name where names say it, else in registration order."""
    roles: dict[str, str] = {}
    for role, aliases in ROLE_NAMES.items():
        match = [n for n in names if n.rpartition(".")[2].lower() in aliases and n not in roles.values()]
        if len(match) == 1:
            roles[role] = match[0]
    rest = [n for n in names if n not in roles.values()]
    for role in ROLE_NAMES:
        if role not in roles:
            roles[role] = rest.pop(0)
    return roles


def top_level_parts(model: nn.Module, stack_name: str, width: int, vocab: int) -> tuple[str, str]:
    """(final norm, head) module names outside the stack: the width-sized norm that runs last, and the output
    projection (`get_output_embeddings()`, else the [V, d] projection; a tied input table as the last resort)."""
    outside = {n: m for n, m in model.named_modules() if n and n != stack_name and not n.startswith(stack_name + ".")}
    final = _runs_last(model, {n: m for n, m in outside.items() if is_norm(m, width)})
    if final is None:
        raise ImportRefused("no final norm found after the decoder stack")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shaped = [n for n, m in outside.items() if is_projection(m) and tuple(matrix(m).shape) == (vocab, width)]
    heads = ([n for n, m in outside.items() if m is head] or
             [n for n in shaped if not isinstance(outside[n], nn.Embedding)] or shaped)
    if len(heads) != 1:
        raise ImportRefused(f"cannot find the output projection [{vocab}, {width}] (found {heads})")
    if getattr(outside[heads[0]], "bias", None) is not None:
        raise ImportRefused(f"the output projection {heads[0]} has a bias; FMBC heads have none")
    return final, heads[0]


def _runs_last(model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    """Which of `modules` the model's forward calls last (the final norm, whatever order they were declared)."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda *_, name=n: order.append(name)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            logits_of(model, torch.zeros(1, 1, dtype=torch.long))
    finally:
        for handle in handles:
            handle.remove()
    return order[-1] if order else None


# ---------------------------------------------------------------------------------------------- observing


class _Stop(Exception):
    pass


def observe_stream(model: nn.Module, modules: list[nn.Module], ids: torch.Tensor,
                   stop_after_first: bool = False) -> list[torch.Tensor]:
    """The tensor entering each of `modules` (the residual stream, for blocks and the final norm) when the
    model runs on `ids` [B, T], in float32. `stop_after_first` aborts the forward once the first is seen."""
    streams: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        streams.append(hidden.detach().float())
        if stop_after_first:
            raise _Stop

    handles = [m.register_forward_pre_hook(grab, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            logits_of(model, ids)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return streams


def width_and_vocab(model: nn.Module, first_block: nn.Module) -> tuple[int, int]:
    """The model width (the first block's input) and V (the logits), from a one-token input."""
    probe = torch.zeros(1, 1, dtype=torch.long)
    width = observe_stream(model, [first_block], probe, stop_after_first=True)[0].shape[-1]
    with torch.no_grad():
        return width, logits_of(model, probe).shape[-1]


def observe_inputs(model: nn.Module, first_block: nn.Module, vocab: int, progress: bool = False,
                   chunk: int = 4096) -> torch.Tensor:
    """The first block's input for every id as a one-token sequence: [V, d], the foreign model's input code
    (whether a stored table or computed in `forward`)."""
    from tqdm import tqdm

    rows = []
    for start in tqdm(range(0, vocab, chunk), desc="observing the input of every id", disable=not progress):
        ids = torch.arange(start, min(vocab, start + chunk)).unsqueeze(1)
        rows.append(observe_stream(model, [first_block], ids, stop_after_first=True)[0][:, 0])
    return torch.cat(rows)


# ---------------------------------------------------------------------------------------------- the code


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
        raise ImportRefused(f"the input table is a two-valued binary code except at id(s) {_few(bad)} "
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
        solved = _solve_columns(bits)
        if best is None or solved[2] < best[2][2] or (solved[2] == best[2][2] and solved[0] < best[2][0]):
            best = (kind, scale, solved)
    kind, scale, (affine_cost, functions, bad_ids) = best
    if bad_ids:
        if len(bad_ids) <= max(1, vocab // 100):
            raise ImportRefused(f"the input table is a binary code except at id(s) {_few(bad_ids)}, whose rows "
                                "follow no code the other ids share: refusing a damaged code")
        return {"input_mode": "learned"}, "two-valued, but no affine function of the id bits: imported as learned"
    return _code_fields(vocab, width, kind, scale, functions, table)


def _few(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")


def _solve_columns(bits: torch.Tensor) -> tuple[int, list[tuple[int, int]], list[int]]:
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


def _code_fields(vocab: int, width: int, kind: str, scale: float, functions: list[tuple[int, int]],
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
    code = _standard_layout(vocab, width, width_bits, base, reorder=not plain)
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


def _standard_layout(vocab: int, width: int, width_bits: list[int], base: dict, reorder: bool) -> BinaryCode | None:
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


# ---------------------------------------------------------------------------------------------- probing


def probe_norm(module: nn.Module, width: int) -> tuple[str, float]:
    """(`layernorm` or `rmsnorm`, eps) of a norm module, found by calling it: eps is solved from an input
    small enough that eps dominates, then the whole formula is checked on an ordinary input."""
    scale, shift = (t.detach().float() for t in (*norm_tensors(module)[:1], _shift_or_zero(module)))
    gen = torch.Generator().manual_seed(0)
    usable = scale.abs() > 1e-3
    results = []
    for kind in ("layernorm", "rmsnorm"):
        tiny = torch.randn(4, width, generator=gen) * 1e-4 + (1e-4 if kind == "layernorm" else 0.0)
        with torch.no_grad():
            unit = (module(tiny).float() - shift) / scale
        centred = tiny - tiny.mean(-1, keepdim=True) if kind == "layernorm" else tiny
        spread = centred.pow(2).mean(-1, keepdim=True)
        ok = usable & (unit.abs() > 1e-3)
        estimate = float(((centred / unit).pow(2) - spread)[ok.expand_as(unit)].median()) if ok.any() else 1e-5
        eps = _snap_eps(estimate)
        x = torch.randn(3, 7, width, generator=gen) * 2 + 0.5
        with torch.no_grad():
            got = module(x).float()
        centred = x - x.mean(-1, keepdim=True) if kind == "layernorm" else x
        want = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * scale + shift
        results.append((float((got - want).abs().max()) / max(1.0, float(got.abs().max())), kind, eps))
    error, kind, eps = min(results)
    if error > 1e-5:
        raise ImportRefused(f"norm {type(module).__name__} is neither LayerNorm nor RMSNorm (closest: {kind}, "
                            f"relative error {error:.1e})")
    if kind == "rmsnorm" and bool(shift.any()):
        raise ImportRefused("an RMSNorm with a non-zero bias has no FMBC form")
    return kind, eps


def _shift_or_zero(module: nn.Module) -> torch.Tensor:
    scale, shift = norm_tensors(module)
    return torch.zeros_like(scale) if shift is None else shift


def _snap_eps(estimate: float) -> float:
    """Round an estimated eps to the common value it is within 2 % of, if any."""
    for common in (1e-5, 1e-6, 1e-8, 1e-12, 1e-7, 1e-10, 1e-9, 1e-4, 1e-3):
        if abs(estimate - common) <= 0.02 * common:
            return common
    return float(f"{max(estimate, 1e-12):.3g}")


def probe_activation(mlp: nn.Module, up: nn.Module, down: nn.Module, width: int) -> list[str]:
    """GELU variants that reproduce `mlp(x)`, closest first; both when the module cannot be called alone (tested
    later). The probe is scaled so that the pre-activations spread over ±4, where exact and tanh GELU differ by up
    to 5e-4: with small (freshly initialised) weights, random inputs would not tell them apart."""
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        projected = x @ matrix(up).t()
        scale = 2.0 / max(float(projected.std()), 1e-12)
        x, pre_activation = x * scale, projected * scale + _bias(up)
    try:
        with torch.no_grad():
            got = mlp(x).float()
    except Exception:  # noqa: BLE001 (a module with its own signature: leave it to the block test)
        return ["gelu", "gelu_tanh"]
    errors = {}
    for act, approximate in (("gelu", "none"), ("gelu_tanh", "tanh")):
        with torch.no_grad():
            want = nn.functional.gelu(pre_activation, approximate=approximate) @ matrix(down).t() + _bias(down)
        errors[act] = float((got - want).abs().max())
    found = sorted((act for act, error in errors.items() if error <= 1e-5 * max(1.0, float(got.abs().max()))),
                   key=errors.get)
    if not found:
        raise ImportRefused(f"the MLP ({type(mlp).__name__}) is not up -> GELU (exact or tanh) -> down")
    return found


def _bias(module: nn.Module) -> torch.Tensor | float:
    bias = getattr(module, "bias", None)
    return 0.0 if bias is None else bias.detach()


# ---------------------------------------------------------------------------------------------- conversion


@dataclass(frozen=True)
class Attention:
    """The attention conventions a candidate assumes."""

    heads: int
    fused_order: str  # "qkv" (q, k, v stacked) or "per_head" (each head's q, k, v together, GPT-NeoX)
    rotary: str  # "rotate_half" or "interleaved"
    rotary_dim: int
    theta: float


def split_qkv(weights: list[torch.Tensor], conv: Attention, width: int) -> list[torch.Tensor]:
    """q, k, v weights (or biases) in our rotate-half form."""
    if len(weights) == 1:
        fused = weights[0]
        if conv.fused_order == "qkv":
            parts = list(fused.split(width, dim=0))
        else:
            per_head = fused.reshape(conv.heads, 3, width // conv.heads, *fused.shape[1:])
            parts = [per_head[:, i].reshape(width, *fused.shape[1:]) for i in range(3)]
    else:
        parts = list(weights)
    if conv.rotary == "interleaved":  # pairs (2i, 2i+1) -> (i, i + r/2): exact, q·k is unchanged
        head_dim = width // conv.heads
        r = conv.rotary_dim
        perm = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, head_dim)])
        parts[:2] = [p.reshape(conv.heads, head_dim, *p.shape[1:])[:, perm].reshape(p.shape) for p in parts[:2]]
    return [p.contiguous() for p in parts]


def convert_block(block: nn.Module, layout: BlockLayout, conv: Attention, width: int, prefix: str
                  ) -> dict[str, torch.Tensor]:
    """One foreign block's tensors under our canonical names (`prefix` = "model.layers.{i}")."""
    get = block.get_submodule
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in (("input_layernorm", layout.attn_norm), ("post_attention_layernorm", layout.mlp_norm)):
        scale, shift = norm_tensors(get(theirs))
        out[f"{prefix}.{ours}.weight"] = scale.detach()
        out[f"{prefix}.{ours}.bias"] = _shift_or_zero(get(theirs)).detach()
    qkv = [get(n) for n in layout.qkv]
    names = ("q_proj", "k_proj", "v_proj")
    for name, weight in zip(names, split_qkv([matrix(m).detach() for m in qkv], conv, width), strict=True):
        out[f"{prefix}.self_attn.{name}.weight"] = weight
    biases = [getattr(m, "bias", None) for m in qkv]
    if any(b is not None for b in biases):
        full = [torch.zeros(m.weight.numel() // width) if b is None else b.detach() for m, b in zip(qkv, biases,
                                                                                                    strict=True)]
        for name, bias in zip(names, split_qkv(full, conv, width), strict=True):
            out[f"{prefix}.self_attn.{name}.bias"] = bias
    for ours, theirs in (("self_attn.o_proj", layout.out), ("mlp.up_proj", layout.up), ("mlp.down_proj", layout.down)):
        module = get(theirs)
        out[f"{prefix}.{ours}.weight"] = matrix(module).detach().contiguous()
        if getattr(module, "bias", None) is not None:
            out[f"{prefix}.{ours}.bias"] = module.bias.detach()
    return out



def complete(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Exactly the `expected` tensors: zero biases where the foreign model has none but our config needs them
    (e.g. k has a bias, o has not), and no biases the config lacks (an RMSNorm, a LayerNorm without bias)."""
    return {name: tensors[name] if name in tensors else torch.zeros(shape) for name, shape in expected.items()}


# ---------------------------------------------------------------------------------------------- recognition


@dataclass
class Recognised:
    """What `fmbc import` found (written to DIR/import_report.json)."""

    source: str
    config: dict
    code: str
    attention: dict
    norm: dict
    activation: str
    names: dict[str, str]
    proof: dict = field(default_factory=dict)


def _config_value(config: object, keys: tuple[str, ...]) -> object:
    return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), None)


def rotary_candidates(model: nn.Module, head_dim: int) -> tuple[list[int], list[float]]:
    """Rotated dimensions and bases to test: what inv_freq buffers and the config suggest first, then the rest."""
    dims, thetas = [], []
    for name, buffer in model.named_buffers():
        if "inv_freq" in name and buffer.dim() == 1 and buffer.numel() >= 2:
            dims.append(2 * buffer.numel())
            thetas.append(float(buffer[1].double() ** (-buffer.numel())))
    fraction = _config_value(model.config, FRACTION_KEYS)
    if isinstance(fraction, (int, float)):
        dims.append(round(float(fraction) * head_dim))
    if isinstance(getattr(model.config, "rotary_dim", None), int):
        dims.append(model.config.rotary_dim)
    dims += [head_dim, *range(head_dim - 2, 0, -2)]
    theta = _config_value(model.config, THETA_KEYS)
    if isinstance(theta, (int, float)):
        thetas.append(float(theta))
    thetas = [next((c for c in COMMON_THETAS if abs(t - c) <= 1e-3 * c), t) for t in thetas]
    return (list(dict.fromkeys(d for d in dims if 0 < d <= head_dim and d % 2 == 0)),
            list(dict.fromkeys([*thetas, *COMMON_THETAS])))


def _rotary_pct(rotary_dim: int, head_dim: int) -> float:
    """A rotary_pct whose int(head_dim * pct) is exactly rotary_dim."""
    pct = rotary_dim / head_dim
    return pct if int(head_dim * pct) == rotary_dim else (rotary_dim + 0.5) / head_dim


def recognise_attention(model: nn.Module, block: nn.Module, layout: BlockLayout, fields: dict,
                        streams: list[torch.Tensor], activations: list[str]) -> tuple[Attention, str]:
    """The attention conventions (and activation, if probing left two) under which our block, run on the
    foreign first block's input, gives the foreign block's output. Bases come from buffers, the config and
    common values; if none fits, the base of the closest candidate is fitted by a search over log(theta)."""
    from .weights import canonical_tensors

    width = fields["hidden_size"]
    configured = _config_value(model.config, HEAD_KEYS)
    heads_options = list(dict.fromkeys([*([int(configured)] if isinstance(configured, int) else []),
                                        *(h for h in range(1, width + 1) if width % h == 0 and width // h % 2 == 0)]))
    x, target = streams[0], streams[1]
    positions = torch.arange(x.shape[1]).unsqueeze(0)
    mask = causal_mask(x.shape[1], 0, None, x.device)

    def block_error(layer: FMBCDecoderLayer, heads: int, dim: int, theta: float) -> float:
        rope = FMBCConfig(**{**fields, "num_attention_heads": heads, "rope_theta": theta,
                             "rotary_pct": _rotary_pct(dim, width // heads), "input_mode": "learned"})
        with torch.no_grad():
            hidden, residual = layer(torch.zeros_like(x), x, FMBCRotaryEmbedding(rope)(positions), mask, None)
        return float((hidden + residual - target).abs().max()) / max(1.0, float(target.abs().max()))

    def loaded_layer(conv: Attention, act: str) -> FMBCDecoderLayer:
        config = FMBCConfig(**{**fields, "num_attention_heads": conv.heads, "hidden_act": act,
                               "num_hidden_layers": 1, "input_mode": "learned"})
        layer = FMBCDecoderLayer(config, layer_idx=1).eval()  # an index > 0 normalises its own input
        expected = {k.removeprefix("model.layers.0."): shape for k, shape in canonical_tensors(config).items()
                    if k.startswith("model.layers.0.")}
        converted = convert_block(block, layout, conv, width, "")
        layer.load_state_dict(complete({k.removeprefix("."): v for k, v in converted.items()}, expected))
        return layer

    best: tuple[float, Attention | None, str] = (math.inf, None, "")
    for heads in heads_options:  # the configured count first: usually it is the only one tried
        best_here: tuple[float, Attention | None, str] = (math.inf, None, "")
        dims, thetas = rotary_candidates(model, width // heads)
        for act, order, rotary, dim in itertools.product(activations, ("qkv", "per_head") if len(layout.qkv) == 1
                                                         else ("qkv",), ("rotate_half", "interleaved"), dims):
            layer = loaded_layer(Attention(heads, order, rotary, dim, 0.0), act)
            for theta in thetas:
                error = block_error(layer, heads, dim, theta)
                if error < best_here[0]:
                    best_here = (error, Attention(heads, order, rotary, dim, theta), act)
                if error <= 1e-5:
                    return best_here[1], act
        conv, act = best_here[1], best_here[2]
        layer = loaded_layer(conv, act)
        theta = _fit_theta(lambda t, layer=layer, conv=conv: block_error(layer, conv.heads, conv.rotary_dim, t))
        if block_error(layer, conv.heads, conv.rotary_dim, theta) <= 1e-5:
            return Attention(conv.heads, conv.fused_order, conv.rotary, conv.rotary_dim, theta), act
        best = min(best, best_here, key=lambda candidate: candidate[0])
    raise ImportRefused(f"the first block matches no supported convention (pre-norm attention with rotary "
                        f"positions, then a GELU MLP); closest: {best[1]} with {best[2]}, relative error "
                        f"{best[0]:.1e}. Learned absolute positions, parallel residuals or other attention "
                        "scalings are not of this family")


def _fit_theta(error: Callable[[float], float]) -> float:
    """The rotary base in [10, 1e8] minimising `error`: a log grid, then golden-section refinement, then the
    shortest decimal that still fits."""
    grid = [10 ** (1 + 7 * i / 70) for i in range(71)]
    errors = [error(t) for t in grid]
    i = min(range(len(grid)), key=errors.__getitem__)
    lo, hi = math.log(grid[max(0, i - 1)]), math.log(grid[min(len(grid) - 1, i + 1)])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if error(math.exp(a)) < error(math.exp(b)):
            hi = b
        else:
            lo = a
    theta = math.exp((lo + hi) / 2)
    for digits in range(1, 8):  # the shortest decimal that fits to the same tolerance
        rounded = float(f"{theta:.{digits}g}")
        if error(rounded) <= 1e-5:
            return rounded
    return theta


def recognise(model: nn.Module, source: str, progress: bool = False
              ) -> tuple[Recognised, FMBCConfig, dict[str, torch.Tensor]]:
    """Solve a foreign model into our config and tensors (proven separately by `prove`)."""
    from .weights import canonical_tensors

    stack_name, stack = find_blocks(model)
    block = stack[0]
    width, vocab = width_and_vocab(model, block)
    layout = block_layout(block, width)
    final_name, head_name = top_level_parts(model, stack_name, width, vocab)
    final_norm, head = model.get_submodule(final_name), model.get_submodule(head_name)
    context = _config_value(model.config, CONTEXT_KEYS)
    if not isinstance(context, int):
        raise ImportRefused(f"the config names no context length (looked for {', '.join(CONTEXT_KEYS)})")
    table = observe_inputs(model, block, vocab, progress)
    code_fields, code_note = solve_code(table)
    get = block.get_submodule
    norm_kind, eps = probe_norm(get(layout.attn_norm), width)
    for other in (get(layout.mlp_norm), final_norm):
        if probe_norm(other, width) != (norm_kind, eps):
            raise ImportRefused("the model's norms differ in type or eps; FMBC uses one norm throughout")
    mlp_parent = layout.down.rpartition(".")[0]
    activations = probe_activation(get(mlp_parent) if mlp_parent else block, get(layout.up), get(layout.down),
                                   width)
    fields = dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=len(stack),
                  intermediate_size=matrix(get(layout.down)).shape[1], max_position_embeddings=context,
                  norm_type=norm_kind, norm_eps=eps,
                  attention_bias=any(getattr(get(n), "bias", None) is not None for n in (*layout.qkv, layout.out)),
                  mlp_bias=any(getattr(get(n), "bias", None) is not None for n in (layout.up, layout.down)))
    sample = torch.randint(0, vocab, (2, min(context, 24)), generator=torch.Generator().manual_seed(2))
    streams = observe_stream(model, [block, stack[1] if len(stack) > 1 else final_norm], sample)
    conv, act = recognise_attention(model, block, layout, fields, streams, activations)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(getattr(model.config, key, None), int):
            fields[key] = getattr(model.config, key)
    fields.update(code_fields, num_attention_heads=conv.heads, hidden_act=act, rope_theta=conv.theta,
                  rotary_pct=_rotary_pct(conv.rotary_dim, width // conv.heads))
    config = FMBCConfig(**fields)
    tensors: dict[str, torch.Tensor] = {}
    for i, foreign_block in enumerate(stack):
        tensors.update(convert_block(foreign_block, layout, conv, width, f"model.layers.{i}"))
    tensors["model.norm.weight"] = norm_tensors(final_norm)[0].detach()
    tensors["model.norm.bias"] = _shift_or_zero(final_norm).detach()
    tensors["lm_head.weight"] = matrix(head).detach()
    if config.input_mode == "learned":
        tensors["model.embed_tokens.weight"] = table
    names = {f"{stack_name}.{{i}}.{theirs}": f"model.layers.{{i}}.{ours}" for ours, theirs in (
        ("input_layernorm", layout.attn_norm), ("post_attention_layernorm", layout.mlp_norm),
        ("self_attn.o_proj", layout.out), ("mlp.up_proj", layout.up), ("mlp.down_proj", layout.down))}
    qkv_targets = ["self_attn.q_proj + k_proj + v_proj"] if len(layout.qkv) == 1 else [
        f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    names.update({f"{stack_name}.{{i}}.{n}": f"model.layers.{{i}}.{t}" for n, t in zip(layout.qkv, qkv_targets,
                                                                                       strict=True)})
    names.update({final_name: "model.norm", head_name: "lm_head",
                  "(first block input)": "model.embed_tokens" + (".weight" if config.input_mode == "learned"
                                                                 else " (fixed code, no tensor)")})
    recognised = Recognised(source=source, config=fields, code=code_note, attention=asdict(conv),
                            norm={"type": norm_kind, "eps": eps}, activation=act, names=names)
    return recognised, config, complete(tensors, canonical_tensors(config))


# ---------------------------------------------------------------------------------------------- proof


def _stream_modules(model: nn.Module) -> list[nn.Module]:
    """Blocks and final norm of a model, ours or foreign: their inputs are the residual stream."""
    if isinstance(model, FMBCForCausalLM):
        return [layer.input_layernorm for layer in model.model.layers] + [model.model.norm]
    stack_name, stack = find_blocks(model)
    width, vocab = width_and_vocab(model, stack[0])
    return [*stack, model.get_submodule(top_level_parts(model, stack_name, width, vocab)[0])]


def first_divergence(foreign: nn.Module, ours: FMBCForCausalLM, ids: torch.Tensor) -> str:
    """Which stage's output first differs between the two models on `ids` (the diagnosis of a failed proof)."""
    theirs = observe_stream(foreign, _stream_modules(foreign), ids)
    mine = observe_stream(ours, _stream_modules(ours), ids)
    for i, (a, b) in enumerate(zip(theirs, mine, strict=True)):
        delta = float((a - b).abs().max())
        if delta > TOLERANCE * max(1.0, float(a.abs().max())):
            stage = "the input code" if i == 0 else f"layer {i - 1}'s output"
            return f"{stage} first differs (max |Δ| {delta:.2e})"
    return "every layer's output agrees; the final norm or head differs"


def _greedy(model: nn.Module, prompt: torch.Tensor, steps: int) -> list[int]:
    ids = prompt
    for _ in range(steps):
        with torch.no_grad():
            ids = torch.cat([ids, logits_of(model, ids)[:, -1:].argmax(-1)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def prove(foreign: nn.Module, ours: FMBCForCausalLM, vocab: int, context: int, progress: bool = False,
          chunk: int = 1024) -> dict:
    """Run both models in fp32 on every id as a one-token input and on random sequences up to the context
    length; raise ImportRefused (with the first diverging layer) unless max |Δlogit| ≤ TOLERANCE and every
    greedy token agrees. Returns the figures."""
    from tqdm import tqdm

    single_worst, worst_ids, disagree = 0.0, None, []
    for start in tqdm(range(0, vocab, chunk), desc="proof: every id", disable=not progress):
        ids = torch.arange(start, min(vocab, start + chunk)).unsqueeze(1)
        with torch.no_grad():
            a, b = logits_of(foreign, ids)[:, -1], logits_of(ours, ids)[:, -1]
        delta = (a - b).abs().amax(-1)
        if float(delta.max()) > single_worst:
            single_worst, worst_ids = float(delta.max()), ids[int(delta.argmax())].unsqueeze(0)
        disagree += ids[a.argmax(-1) != b.argmax(-1), 0].tolist()
    gen = torch.Generator().manual_seed(3)
    lengths = sorted({context, max(1, context // 2), min(context, 37), min(context, 5)}, reverse=True)
    worst, sequence_worst = single_worst, 0.0
    for length in tqdm(lengths, desc="proof: sequences", disable=not progress):
        ids = torch.randint(0, vocab, (1, length), generator=gen)
        with torch.no_grad():
            a, b = logits_of(foreign, ids), logits_of(ours, ids)
        delta = float((a - b[:, -a.shape[1]:]).abs().max())
        if delta > sequence_worst:
            sequence_worst = delta
            if delta > worst:
                worst, worst_ids = delta, ids
    steps = min(8, context - 1)
    prompts = [torch.randint(0, vocab, (1, max(1, min(16, context - steps))), generator=gen) for _ in range(3)]
    greedy = [(_greedy(foreign, p, steps), _greedy(ours, p, steps)) for p in prompts]
    figures = {"single_token_ids": vocab, "max_abs_delta_logit_single_token": single_worst,
               "sequence_lengths": lengths, "max_abs_delta_logit_sequences": sequence_worst,
               "max_abs_delta_logit": worst, "greedy_next_token_disagreements": len(disagree),
               "greedy_continuations": f"{sum(x == y for x, y in greedy)}/{len(greedy)} equal ({steps} tokens)",
               "tolerance": TOLERANCE}
    if worst > TOLERANCE or disagree or any(x != y for x, y in greedy):
        where = first_divergence(foreign, ours, worst_ids if worst_ids is not None else prompts[0])
        raise ImportRefused(f"the converted model does not reproduce the source: max |Δlogit| {worst:.2e} "
                            f"(tolerance {TOLERANCE:g}), {len(disagree)} single-token greedy disagreement(s) "
                            f"{_few(disagree)}, greedy continuations {figures['greedy_continuations']}; {where}")
    return figures


# ---------------------------------------------------------------------------------------------- the command


def import_checkpoint(src: str, out_dir: str | Path, trust_remote_code: bool = False, progress: bool = True
                      ) -> Recognised:
    """Convert SRC into an fmbc-serve checkpoint at `out_dir`, proven equal to SRC, or raise ImportRefused
    leaving `out_dir` untouched (SRC is only read)."""
    from .checkpoint import save_checkpoint
    from .tokenizer import CHAT_TEMPLATE

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ImportRefused(f"{out} exists and is not empty; choose a new folder")
    foreign, tokenizer = load_foreign(src, trust_remote_code)
    recognised, config, tensors = recognise(foreign, src, progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model = FMBCForCausalLM(config)
        model.load_state_dict(tensors, strict=True, assign=True)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHAT_TEMPLATE
            recognised.names["(chat template)"] = "added (the source has none)"
        save_checkpoint(model.eval(), tokenizer, staging)
        copy_tokenizer_code(src, staging)
        del model, tensors
        written = FMBCForCausalLM.from_pretrained(staging, dtype=torch.float32).eval()
        recognised.proof = prove(foreign, written, config.vocab_size, config.max_position_embeddings, progress)
        (staging / REPORT_FILE).write_text(json.dumps(asdict(recognised), indent=2) + "\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return recognised


def copy_tokenizer_code(src: str, out: Path) -> None:
    """A tokenizer with code of its own keeps it: copy the modules its saved `auto_map` names from SRC."""
    saved = out / "tokenizer_config.json"
    auto_map = json.loads(saved.read_text()).get("auto_map") if saved.is_file() else None
    if auto_map and Path(src).is_dir():
        for module in {ref.rpartition("--")[2].split(".")[0] for ref in _auto_map_refs(auto_map)}:
            shutil.copyfile(Path(src) / f"{module}.py", out / f"{module}.py")


def format_report(recognised: Recognised) -> str:
    """The table `fmbc import` prints: what was recognised and the proof's figures."""
    c = recognised.config
    code = (f"{c['input_mode']}: learned table" if c["input_mode"] == "learned" else
            f"{c['input_mode']}: order={c['code_bit_order']} values={c['code_values']} scale={c['code_scale']:g} "
            f"layout={c['code_layout']}" + (f" A={c['affine_rows']} b={c['affine_bias']}" if "affine_rows" in c
                                             else ""))
    a = recognised.attention
    rows = [("input code", f"{code} ({recognised.code})"),
            ("shape", f"V={c['vocab_size']} d={c['hidden_size']} layers={c['num_hidden_layers']} heads={a['heads']} "
                      f"MLP={c['intermediate_size']} context={c['max_position_embeddings']}"),
            ("rotary", f"{a['rotary']} pairs, theta={a['theta']:g}, rotary_dim={a['rotary_dim']} of "
                       f"{c['hidden_size'] // a['heads']}" + (f", fused qkv order {a['fused_order']}"
                                                             if any("+" in v for v in recognised.names.values())
                                                             else "")),
            ("norm / activation", f"{recognised.norm['type']} eps={recognised.norm['eps']:g} / "
                                  f"{recognised.activation}"),
            ("biases", f"attention={c['attention_bias']} mlp={c['mlp_bias']}")]
    rows += [(f"name {theirs}", ours) for theirs, ours in recognised.names.items()]
    rows += [(f"proof {k}", str(v)) for k, v in recognised.proof.items()]
    return "\n".join(f"{k:<44} {v}" for k, v in rows)
