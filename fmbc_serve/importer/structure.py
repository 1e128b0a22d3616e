"""Where a foreign model keeps each part, found once from its modules and shapes (names only order q/k/v/o).

`discover` returns a `Structure`: the decoder stack, one block's layout (which norm feeds attention and which
the MLP, q/k/v or a fused qkv, the output projection, the MLP's up and down, and the block style read from the
data flow), the final norm and the head, the width and V. Recognition, conversion and the proof all read this
one result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ImportRefused
from .source import logits_of, observe_stream, run_watching

# Last name component -> projection role, for separate q/k/v/o (registration order breaks remaining ties).
ROLE_NAMES = {
    "q": ("q", "q_proj", "wq", "query", "to_q", "q_lin", "w_q"),
    "k": ("k", "k_proj", "wk", "key", "to_k", "k_lin", "w_k"),
    "v": ("v", "v_proj", "wv", "value", "to_v", "v_lin", "w_v"),
    "o": ("o", "o_proj", "wo", "out_proj", "c_proj", "dense", "out", "proj", "to_out", "output", "w_o"),
}


def matrix(module: nn.Module) -> torch.Tensor:
    """A projection's weight as [out, in] (GPT-2's Conv1D stores [in, out])."""
    weight = module.weight
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def own_params(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The module's parameters, not its children's."""
    return list(module.named_parameters(recurse=False))


def is_projection(module: nn.Module) -> bool:
    """A module with a 2-D weight (Linear, Conv1D, an embedding used as a head)."""
    return isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


def is_norm(module: nn.Module, width: int) -> bool:
    """A module whose own parameters are one or two width-sized vectors (scale, and perhaps shift)."""
    params = own_params(module)
    return bool(params) and all(p.dim() == 1 and p.shape[0] == width for _, p in params) and len(params) <= 2


def norm_tensors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale, shift) of a norm module, whatever its parameter names (weight/scale/gamma/g, bias/beta/b)."""
    params = dict(own_params(module))
    shift_name = next((n for n in params if n in ("bias", "beta", "b", "shift")), None)
    scale_name = next(n for n in params if n != shift_name)
    return params[scale_name], params.get(shift_name) if shift_name else None


def norm_shift(module: nn.Module) -> torch.Tensor:
    """A norm's shift, or zeros for a norm without one."""
    scale, shift = norm_tensors(module)
    return torch.zeros_like(scale) if shift is None else shift


def bias_of(module: nn.Module) -> torch.Tensor | float:
    """A projection's bias, or 0.0."""
    bias = getattr(module, "bias", None)
    return 0.0 if bias is None else bias.detach()


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
    """Where one block keeps each part, as module names relative to the block, and how it combines them."""

    attn_norm: str
    mlp_norm: str | None  # None: the MLP reads the attention's norm (GPT-J)
    qkv: tuple[str, ...]  # one fused projection, or q, k, v
    out: str
    up: str
    down: str
    block_style: str  # FMBCConfig.block_style


@dataclass
class BlockParts:
    """A block's width-sized norms and its projections by role, found from shapes alone."""

    norms: list[str]
    qkv: tuple[str, ...]
    out: str
    up: str
    down: str


def block_parts(block: nn.Module, width: int) -> BlockParts:
    """Find a block's norms and projections from shapes; names only order separate q/k/v/o."""
    norms = [n for n, m in block.named_modules() if n and is_norm(m, width)]
    projections = {n: tuple(matrix(m).shape) for n, m in block.named_modules() if n and is_projection(m)}
    if len(norms) not in (1, 2):
        raise ImportRefused(f"a block has {len(norms)} width-sized norms ({norms}); an FMBC block has one before "
                            "attention and one before the MLP, or one that both read (GPT-J)")
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
        return BlockParts(norms, (fused[0],), squares[0], ups[0], downs[0])
    roles = assign_roles(squares)
    return BlockParts(norms, (roles["q"], roles["k"], roles["v"]), roles["o"], ups[0], downs[0])


def block_layout(model: nn.Module, block: nn.Module, width: int, vocab: int) -> BlockLayout:
    """The block's parts, with which norm feeds attention and which the MLP, and the block style, read from what
    flows where in one forward pass: the norm whose output enters q/k/v is the attention's, the one whose output
    enters the MLP's up projection is the MLP's (the same one: GPT-J's shared norm); an MLP norm that reads the
    block's own input makes a parallel residual (GPT-NeoX), one that reads the stream after attention a
    sequential block. The attention test (`recognise_attention`) then runs our block of that style against it."""
    parts = block_parts(block, width)
    flows: dict[str, torch.Tensor] = {}

    def record(key: str) -> Callable[[torch.Tensor], object]:
        # the object itself: the same tensor passed on is the surest sign
        return lambda tensor: flows.setdefault(key, tensor)

    get = block.get_submodule
    inputs = [(block, record("block")), (get(parts.qkv[0]), record("qkv")), (get(parts.up), record("up")),
              *((get(name), record(f"{name}:in")) for name in parts.norms)]
    outputs = [(get(name), record(f"{name}:out")) for name in parts.norms]
    run_watching(model, torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(4)), inputs, outputs)

    def feeding(target: str) -> str:
        found = ([n for n in parts.norms if flows.get(f"{n}:out") is flows.get(target)] or
                 [n for n in parts.norms if same_value(flows.get(f"{n}:out"), flows.get(target))])
        if not found:
            raise ImportRefused(f"no norm's output enters {'attention' if target == 'qkv' else 'the MLP'} "
                                f"({parts.qkv[0] if target == 'qkv' else parts.up}): an FMBC block normalises "
                                "before attention and before the MLP (pre-norm)")
        return found[0]

    attn_norm, mlp_norm = feeding("qkv"), feeding("up")
    if attn_norm == mlp_norm:
        return BlockLayout(attn_norm, None, parts.qkv, parts.out, parts.up, parts.down, "parallel_shared_norm")
    style = "parallel" if same_value(flows.get(f"{mlp_norm}:in"), flows["block"]) else "sequential"
    return BlockLayout(attn_norm, mlp_norm, parts.qkv, parts.out, parts.up, parts.down, style)


def same_value(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two recorded tensors are the same value passed on (the same object, or equal data: a copy)."""
    return a is not None and b is not None and (a is b or (a.shape == b.shape and torch.equal(a, b)))


def assign_roles(names: list[str]) -> dict[str, str]:
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
    projection (`get_output_embeddings()`, else the [V, d] projection; a tied input table as the last resort), with
    or without a bias."""
    outside = {n: m for n, m in model.named_modules() if n and n != stack_name and not n.startswith(stack_name + ".")}
    final = runs_last(model, {n: m for n, m in outside.items() if is_norm(m, width)})
    if final is None:
        raise ImportRefused("no final norm found after the decoder stack")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shaped = [n for n, m in outside.items() if is_projection(m) and tuple(matrix(m).shape) == (vocab, width)]
    heads = ([n for n, m in outside.items() if m is head] or
             [n for n in shaped if not isinstance(outside[n], nn.Embedding)] or shaped)
    if len(heads) != 1:
        raise ImportRefused(f"cannot find the output projection [{vocab}, {width}] (found {heads})")
    return final, heads[0]


def runs_last(model: nn.Module, modules: dict[str, nn.Module]) -> str | None:
    """Which of `modules` the model's forward calls last (the final norm, whatever order they were declared)."""
    order: list[str] = []
    run_watching(model, torch.zeros(1, 1, dtype=torch.long),
                 outputs=[(module, lambda _, name=name: order.append(name)) for name, module in modules.items()])
    return order[-1] if order else None


def width_and_vocab(model: nn.Module, first_block: nn.Module) -> tuple[int, int]:
    """The model width (the first block's input) and V (the logits), from a one-token input."""
    probe = torch.zeros(1, 1, dtype=torch.long)
    width = observe_stream(model, [first_block], probe, stop_after_first=True)[0].shape[-1]
    with torch.no_grad():
        return width, logits_of(model, probe).shape[-1]


@dataclass
class Structure:
    """A foreign model's parts: the decoder stack (`stack_name`, its blocks), one block's `layout` (every block
    is alike), the final norm and the head (module names), the width and V."""

    stack_name: str
    blocks: nn.ModuleList
    layout: BlockLayout
    final_norm_name: str
    head_name: str
    width: int
    vocab: int

    def stream_modules(self, model: nn.Module) -> list[nn.Module]:
        """The blocks and the final norm: what each receives is the residual stream at that depth."""
        return [*self.blocks, model.get_submodule(self.final_norm_name)]

    def named_norms(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every norm of the model by its full name: each block's (one or two), then the final norm."""
        layout = self.layout
        norms = [(f"{self.stack_name}.{i}.{name}", block.get_submodule(name)) for i, block in enumerate(self.blocks)
                 for name in (layout.attn_norm, layout.mlp_norm) if name]
        return norms + [(self.final_norm_name, model.get_submodule(self.final_norm_name))]


def discover(model: nn.Module) -> Structure:
    """The foreign model's structure, from its modules, shapes and one forward pass."""
    stack_name, blocks = find_blocks(model)
    width, vocab = width_and_vocab(model, blocks[0])
    layout = block_layout(model, blocks[0], width, vocab)
    final_norm_name, head_name = top_level_parts(model, stack_name, width, vocab)
    return Structure(stack_name, blocks, layout, final_norm_name, head_name, width, vocab)
