"""The import, end to end: recognise the foreign model (each fact by its own module), convert it, write the
checkpoint staged, read it back and prove it, and only then put it in place."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..configuration_fmbc import FMBCConfig
from ..modeling_fmbc import FMBCForCausalLM
from .attention import recognise_attention, rotary_fraction
from .code import solve_code
from .convert import convert_model, name_mapping
from .errors import ImportRefused
from .facts import context_length
from .probes import mlp_activations, shared_norm
from .proof import prove
from .report import REPORT_FILE, Recognised, provenance
from .source import copy_tokenizer_code, load_foreign, observe_inputs, observe_stream, stored_dtype
from .structure import Structure, discover, matrix

# The imported folder's mode: readable by every user, as a folder made with mkdir under the usual umask is (mkdtemp's
# 0700 would hide a shared cache's import from a replica running as another user).
IMPORT_MODE = 0o755


def staging_prefix(out: Path) -> str:
    """An import is written into a hidden sibling of `out` named with this prefix (plus random characters) and
    renamed into place at the end, so that nobody ever reads half an import."""
    return f".{out.name}."

SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


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
    block, vocab = structure.blocks[0], structure.vocab
    context, context_source = context_length(model, block, tokenizer, overrides)
    table = observe_inputs(model, block, vocab, progress)
    code_fields, code_note = solve_code(table)
    if {"norm_type", "norm_eps"} <= overrides.keys():
        norm_kind, eps = str(overrides["norm_type"]), float(overrides["norm_eps"])
    else:
        norm_kind, eps = shared_norm(model, structure)
    activations = [overrides["hidden_act"]] if "hidden_act" in overrides else mlp_activations(structure)
    fields = {**shape_fields(model, structure, context), "norm_type": norm_kind, "norm_eps": eps,
              "block_style": overrides.get("block_style", structure.layout.block_style)}
    sample = torch.randint(0, vocab, (2, min(context, 24)), generator=torch.Generator().manual_seed(2))
    streams = observe_stream(model, structure.stream_modules(model)[:2], sample)
    attention, act = recognise_attention(model, block, structure.layout, fields, streams, activations, overrides)
    fields.update({key: getattr(model.config, key) for key in SPECIAL_TOKENS
                   if isinstance(getattr(model.config, key, None), int)})
    fields.update(code_fields, num_attention_heads=attention.heads, hidden_act=act, rope_theta=attention.theta,
                  partial_rotary_factor=rotary_fraction(attention.rotary_dim, structure.width // attention.heads))
    fields.update(overrides)
    config = FMBCConfig(**fields)
    recognised = Recognised(source=source, config=fields, code=code_note, attention=asdict(attention),
                            norm={"type": norm_kind, "eps": eps}, activation=act,
                            names=name_mapping(structure, config.input_mode),
                            facts={"max_position_embeddings": context_source,
                                   **{field: "--set" for field in overrides}})
    return Conversion(recognised, structure, config, convert_model(model, structure, attention, config, table), table)


def shape_fields(model: nn.Module, structure: Structure, context: int) -> dict[str, object]:
    """The config fields read off the foreign modules' shapes and biases."""
    layout, get = structure.layout, structure.blocks[0].get_submodule
    head = model.get_submodule(structure.head_name)
    return dict(vocab_size=structure.vocab, hidden_size=structure.width, num_hidden_layers=len(structure.blocks),
                intermediate_size=matrix(get(layout.down)).shape[1], max_position_embeddings=context,
                lm_head_bias=getattr(head, "bias", None) is not None,
                attention_bias=any(getattr(get(n), "bias", None) is not None for n in (*layout.qkv, layout.out)),
                mlp_bias=any(getattr(get(n), "bias", None) is not None for n in (layout.up, layout.down)))


def import_checkpoint(src: str, out_dir: str | Path, trust_remote_code: bool = False,
                      overrides: dict[str, object] | None = None, dtype: torch.dtype | None = None,
                      progress: bool = True) -> Recognised:
    """Convert SRC into an fmbc-serve checkpoint at `out_dir`, proven equal to SRC, or raise ImportRefused
    leaving `out_dir` untouched (SRC is only read). The weights are written in `dtype`, by default the dtype SRC
    stores them in; the proof runs in float32, on exactly the values written (read back and compared bitwise).

    Memory: our model shares the source model's tensors wherever the conversion leaves them as they are (only a
    fused q/k/v is split into copies), and nothing is loaded twice (the peak at the published shape:
    docs/import.md)."""
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
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(out), dir=out.parent))
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
        staging.chmod(IMPORT_MODE)
        try:
            staging.rename(out)  # atomic; replaces an empty folder, never a written one
        except OSError as err:
            raise ImportRefused(f"{out} was written by another import meanwhile ({err.strerror}); "
                                "nothing of this one was kept") from err
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
