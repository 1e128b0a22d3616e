"""`fmbc import`: recognise a foreign checkpoint of the FMBC family, convert it, and prove nothing changed.

Published FMBC checkpoints ship their own modeling code and names we cannot know in advance, so nothing here
trusts a name alone. One module a job:
- `source`: load the foreign checkpoint as transformers does (weights as published) and run it;
- `structure`: where it keeps each part (decoder stack, a block's norms and projections, block style from the
  data flow, final norm, head), found once and read by everything after;
- `code`: the input code, solved from what the first block receives for every id;
- `facts`: facts the config names under keys we do not know (the context length), and the user's `--set`;
- `probes`: norms and the activation, by calling the foreign modules;
- `attention`: head count, fused q/k/v order, rotary convention, base and fraction, by testing our block
  against the foreign one;
- `convert`: foreign tensors under our names;
- `proof`: the written checkpoint against the source (input bitwise, block by block, norms, logits, greedy);
- `report`: what was found and proved (import_report.json, the printed table, the folder's README).
- `errors`: `ImportRefused`, the one refusal (the CLI shows it as one line, exit status 2).
Thresholds live in fmbc_serve/tolerances.py.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..configuration_fmbc import ACTIVATIONS, FMBCConfig
from ..modeling_fmbc import FMBCForCausalLM
from ..weights import canonical_tensors
from .attention import recognise_attention, rotary_pct
from .code import solve_code
from .convert import complete, convert_block
from .errors import ImportRefused
from .facts import context_length
from .probes import probe_activation, probe_norm
from .proof import prove
from .report import REPORT_FILE, Recognised, format_report, provenance
from .source import copy_tokenizer_code, load_foreign, observe_inputs, observe_stream, stored_dtype
from .structure import Structure, discover, matrix, norm_shift, norm_tensors

__all__ = ["REPORT_FILE", "ImportRefused", "Recognised", "format_report", "import_checkpoint", "recognise"]


@dataclass
class Conversion:
    """What recognition produced: the report, the foreign structure, our config, our tensors (views of the foreign
    ones where nothing changes) and the foreign first block's input for every id (what the proof holds ours to)."""

    recognised: Recognised
    structure: Structure
    config: FMBCConfig
    tensors: dict[str, torch.Tensor]
    input_table: torch.Tensor


def recognise(model: nn.Module, tokenizer: object, source: str, overrides: dict[str, object] | None = None,
              progress: bool = False) -> Conversion:
    """Solve a foreign model into our config and tensors (proven separately by `prove`). `overrides` are the
    user's own facts (FMBCConfig fields): each replaces what would be inferred, and the proof still checks it."""
    overrides = overrides or {}
    structure = discover(model)
    block, layout, width, vocab = structure.blocks[0], structure.layout, structure.width, structure.vocab
    final_norm, head = model.get_submodule(structure.final_norm_name), model.get_submodule(structure.head_name)
    context, context_source = context_length(model, block, tokenizer, overrides)
    table = observe_inputs(model, block, vocab, progress)
    code_fields, code_note = solve_code(table)
    get = block.get_submodule
    if {"norm_type", "norm_eps"} <= overrides.keys():
        norm_kind, eps = str(overrides["norm_type"]), float(overrides["norm_eps"])
    else:
        norm_kind, eps = probe_norm(get(layout.attn_norm), width)
        for name, other in every_norm(structure, model):
            if (found := probe_norm(other, width)) != (norm_kind, eps):
                raise ImportRefused(f"the model's norms differ: {name} is {found[0]} with eps {found[1]:g}, the "
                                    f"first block's attention norm {norm_kind} with eps {eps:g}; FMBC uses one norm "
                                    "throughout")
    mlp_parent = layout.down.rpartition(".")[0]
    if "hidden_act" in overrides:
        activations = [overrides["hidden_act"]]
    elif not mlp_parent:  # up and down sit in the block itself: no MLP module to call alone, the block test decides
        activations = list(ACTIVATIONS)
    else:
        activations = probe_activation(get(mlp_parent), get(layout.up), get(layout.down), width)
    fields = dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=len(structure.blocks),
                  intermediate_size=matrix(get(layout.down)).shape[1], max_position_embeddings=context,
                  norm_type=norm_kind, norm_eps=eps, block_style=overrides.get("block_style", layout.block_style),
                  lm_head_bias=getattr(head, "bias", None) is not None,
                  attention_bias=any(getattr(get(n), "bias", None) is not None for n in (*layout.qkv, layout.out)),
                  mlp_bias=any(getattr(get(n), "bias", None) is not None for n in (layout.up, layout.down)))
    sample = torch.randint(0, vocab, (2, min(context, 24)), generator=torch.Generator().manual_seed(2))
    streams = observe_stream(model, structure.stream_modules(model)[:2], sample)
    conv, act = recognise_attention(model, block, layout, fields, streams, activations, overrides)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(getattr(model.config, key, None), int):
            fields[key] = getattr(model.config, key)
    fields.update(code_fields, num_attention_heads=conv.heads, hidden_act=act, rope_theta=conv.theta,
                  rotary_pct=rotary_pct(conv.rotary_dim, width // conv.heads))
    fields.update(overrides)
    config = FMBCConfig(**fields)
    tensors: dict[str, torch.Tensor] = {}
    for i, foreign_block in enumerate(structure.blocks):
        tensors.update(convert_block(foreign_block, layout, conv, width, f"model.layers.{i}"))
    tensors["model.norm.weight"] = norm_tensors(final_norm)[0].detach()
    tensors["model.norm.bias"] = norm_shift(final_norm).detach()
    tensors["lm_head.weight"] = matrix(head).detach()
    if config.lm_head_bias:
        tensors["lm_head.bias"] = head.bias.detach()
    if config.input_mode == "learned":
        tensors["model.embed_tokens.weight"] = table
    recognised = Recognised(source=source, config=fields, code=code_note, attention=asdict(conv),
                            norm={"type": norm_kind, "eps": eps}, activation=act,
                            names=name_mapping(structure, config.input_mode),
                            facts={"max_position_embeddings": context_source,
                                   **{field: "--set" for field in overrides}})
    return Conversion(recognised, structure, config, complete(tensors, canonical_tensors(config)), table)


def every_norm(structure: Structure, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every norm of the model by its full name: each block's (one or two) and the final norm."""
    layout, stack = structure.layout, structure.stack_name
    norms = [(f"{stack}.{i}.{name}", block.get_submodule(name)) for i, block in enumerate(structure.blocks)
             for name in (layout.attn_norm, layout.mlp_norm) if name]
    return norms + [(structure.final_norm_name, model.get_submodule(structure.final_norm_name))]


def name_mapping(structure: Structure, input_mode: str) -> dict[str, str]:
    """Foreign module -> ours, for the report (`{i}` stands for every block index)."""
    layout = structure.layout
    parts = [("input_layernorm", layout.attn_norm), ("self_attn.o_proj", layout.out), ("mlp.up_proj", layout.up),
             ("mlp.down_proj", layout.down)]
    if layout.mlp_norm:
        parts.append(("post_attention_layernorm", layout.mlp_norm))
    if len(layout.qkv) == 1:
        parts.append(("self_attn.q_proj + k_proj + v_proj", layout.qkv[0]))
    else:
        parts += [(f"self_attn.{ours}", theirs) for ours, theirs in zip(("q_proj", "k_proj", "v_proj"), layout.qkv,
                                                                        strict=True)]
    names = {f"{structure.stack_name}.{{i}}.{theirs}": f"model.layers.{{i}}.{ours}" for ours, theirs in parts}
    names[structure.final_norm_name] = "model.norm"
    names[structure.head_name] = "lm_head"
    names["(first block input)"] = ("model.embed_tokens.weight" if input_mode == "learned"
                                    else "model.embed_tokens (fixed code, no tensor)")
    return names


def import_checkpoint(src: str, out_dir: str | Path, trust_remote_code: bool = False,
                      overrides: dict[str, object] | None = None, dtype: torch.dtype | None = None,
                      progress: bool = True) -> Recognised:
    """Convert SRC into an fmbc-serve checkpoint at `out_dir`, proven equal to SRC, or raise ImportRefused
    leaving `out_dir` untouched (SRC is only read). The weights are written in `dtype`, by default the dtype SRC
    stores them in; the proof runs in float32, on exactly the values written (read back and compared bitwise).

    Memory: our model shares the source model's tensors wherever the conversion leaves them as they are (only a
    fused q/k/v is split into copies), and nothing is loaded twice: at the published shape the peak is 2.86x the
    checkpoint's size (docs/import.md)."""
    from ..checkpoint import write_checkpoint
    from ..tokenizer import CHAT_TEMPLATE

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ImportRefused(f"{out} exists and is not empty; choose a new folder")
    foreign, tokenizer = load_foreign(src, trust_remote_code)
    conversion = recognise(foreign, tokenizer, src, overrides, progress)
    recognised = conversion.recognised
    dtype = dtype or stored_dtype(src, foreign)
    stored = {name: tensor.to(dtype) for name, tensor in conversion.tensors.items()}  # no copy when unchanged
    lossless = all(torch.equal(stored[name].float(), tensor) for name, tensor in conversion.tensors.items())
    ours = model_from_tensors(conversion.config, conversion.tensors if lossless else
                              {name: tensor.float() for name, tensor in stored.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHAT_TEMPLATE
            recognised.names["(chat template)"] = "added (the source has none)"
        write_checkpoint(conversion.config, stored, tokenizer, staging)
        copy_tokenizer_code(src, staging)
        assert_written(staging, stored)
        recognised.proof = prove(foreign, conversion.structure, ours, conversion.input_table, progress)
        recognised.proof["written_dtype"] = str(dtype).removeprefix("torch.")
        (staging / REPORT_FILE).write_text(json.dumps(asdict(recognised), indent=2) + "\n")
        (staging / "README.md").write_text(provenance(recognised))
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return recognised


def model_from_tensors(config: FMBCConfig, tensors: dict[str, torch.Tensor]) -> FMBCForCausalLM:
    """Our reference model holding `tensors` themselves: built without initialising (or touching) weights of its
    own, then given the tensors (no copy)."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = FMBCForCausalLM(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def assert_written(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The checkpoint file holds exactly `tensors`, read back one at a time (so the proof of the tensors in memory
    is a proof of the file)."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(tensors), "the written checkpoint's tensors differ from the converted ones"
        for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            assert torch.equal(f.get_tensor(name), tensors[name]), f"{name} was not written as converted"
