"""Checkpoint presets, creation and inspection.

A checkpoint folder holds `config.json` (with `auto_map`), `model.safetensors`, a tokenizer of exactly V
entries with a chat template, `generation_config.json`, and the three self-contained source files of the
reference model so that `trust_remote_code=True` loads it where fmbc_serve is not installed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GenerationConfig

from .binary_code import code_bits, random_affine
from .configuration_fmbc import FMBCConfig
from .modeling_fmbc import FMBCForCausalLM
from .tokenizer import build_char_tokenizer, special_token_ids
from .weights import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    canonical_tensors,
    layer_of,
    missing_tensors,
    quantization_configured,
    tensor_problem,
)

SOURCE_FILES = ("binary_code.py", "configuration_fmbc.py", "modeling_fmbc.py")
AUTO_MAP = {
    "AutoConfig": "configuration_fmbc.FMBCConfig",
    "AutoModel": "modeling_fmbc.FMBCModel",
    "AutoModelForCausalLM": "modeling_fmbc.FMBCForCausalLM",
}
ARCHITECTURE = "FMBCForCausalLM"
# Seed of the paper-affine preset's A and b: fixed, so that every `fmbc init --preset paper-affine` draws the
# same recoding (weights still follow --seed).
AFFINE_PRESET_SEED = 2605

_PAPER = dict(vocab_size=65536, hidden_size=1024, num_hidden_layers=32, num_attention_heads=32,
              intermediate_size=4096, max_position_embeddings=1024)
_TINY = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=512, max_position_embeddings=256)
PRESETS: dict[str, dict] = {
    "paper": dict(_PAPER, input_mode="binary"),
    "paper-affine": dict(_PAPER, input_mode="affine"),
    "paper-learned": dict(_PAPER, input_mode="learned"),
    "tiny": dict(_TINY, input_mode="binary"),
    "tiny-affine": dict(_TINY, input_mode="affine"),
    "tiny-learned": dict(_TINY, input_mode="learned"),
}


def make_config(preset: str, **overrides) -> FMBCConfig:
    """A validated config from a preset name plus field overrides. Affine presets get a seeded A and b."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    fields = {**PRESETS[preset], **overrides}
    if fields["input_mode"] == "affine" and fields.get("affine_rows") is None:
        rows, bias = random_affine(code_bits(fields["vocab_size"]), AFFINE_PRESET_SEED)
        fields.update(affine_rows=rows, affine_bias=bias)
    specials = special_token_ids(fields["vocab_size"])
    fields.setdefault("pad_token_id", specials["<pad>"])
    fields.setdefault("bos_token_id", specials["<s>"])
    fields.setdefault("eos_token_id", specials["</s>"])
    return FMBCConfig(**fields)


def save_checkpoint(model: FMBCForCausalLM, tokenizer, out_dir: str | Path) -> Path:
    """Write model, config (with auto_map), tokenizer, generation config and the remote-code files. The weights go
    through `model.save_pretrained`, so a quantizer that replaced it (llm-compressor's compressed saver) writes
    them and its `quantization_config`."""
    out = _prepare(model.config, out_dir)
    model.save_pretrained(out, safe_serialization=True)
    return _add_companions(model.config, tokenizer, out)


def write_checkpoint(config: FMBCConfig, tensors: dict[str, torch.Tensor], tokenizer, out_dir: str | Path) -> Path:
    """`save_checkpoint` from a config and the canonical tensors themselves, with no model built around them
    (`fmbc import` writes the published size this way, from tensors that share the source model's memory)."""
    out = _prepare(config, out_dir)
    config.dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    config.save_pretrained(out)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    return _add_companions(config, tokenizer, out)


def _prepare(config: FMBCConfig, out_dir: str | Path) -> Path:
    """Create the folder and point the config at our classes (architectures, auto_map for trust_remote_code)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.architectures = [ARCHITECTURE]
    config.auto_map = dict(AUTO_MAP)
    return out


def _add_companions(config: FMBCConfig, tokenizer, out: Path) -> Path:
    """What every checkpoint carries beside its weights: tokenizer, generation config, remote-code files."""
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
    here = Path(__file__).parent
    for name in SOURCE_FILES:
        shutil.copyfile(here / name, out / name)
    return out


def init_checkpoint(config: FMBCConfig, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                    progress: bool = False) -> Path:
    """A randomly initialised checkpoint (reproducible from `seed`) with a character-level tokenizer.
    `progress` shows a bar over the three stages (the paper shape takes ~20 s on two cores)."""
    from tqdm import tqdm

    with tqdm(total=3, desc="fmbc init", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("initialising weights")
        torch.manual_seed(seed)
        model = FMBCForCausalLM(config).to(dtype)
        bar.update()
        bar.set_postfix_str("building tokenizer")
        tokenizer = build_char_tokenizer(config.vocab_size)
        bar.update()
        bar.set_postfix_str("writing")
        out = save_checkpoint(model, tokenizer, out_dir)
        bar.update()
    return out


@dataclass
class TensorReport:
    """What `inspect_checkpoint` found: parameter counts by part, and any tensor problems."""

    config: FMBCConfig
    input_params: int
    block_params: int
    head_params: int
    dtypes: dict[str, int]
    problems: list[str]
    quantized: list[str]  # canonical layers whose weights a quantizer replaced (scales, packed weights)

    @property
    def total_params(self) -> int:
        return self.input_params + self.block_params + self.head_params


def read_tensor_shapes(checkpoint_dir: str | Path) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """Tensor name -> shape and -> dtype from the safetensors headers, without loading any weights."""
    shapes, dtypes = {}, {}
    files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {checkpoint_dir}")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = f.get_slice(name)
                shapes[name] = tuple(sl.get_shape())
                dtypes[name] = SAFETENSORS_DTYPES[sl.get_dtype()]
    return shapes, dtypes


def inspect_checkpoint(checkpoint_dir: str | Path) -> TensorReport:
    """Check a checkpoint's tensors against its config by the engines' load policy (`fmbc_serve.weights`), and
    count parameters by part. A layer that holds quantization tensors (when config.json has a
    quantization_config) is left to the engine's quantization method, which checks it at load: here it is only
    counted."""
    config = load_config(checkpoint_dir)
    expected = canonical_tensors(config)
    found, dtypes = read_tensor_shapes(checkpoint_dir)
    counts = {"input": 0, "blocks": 0, "head": 0}
    for name, shape in expected.items():
        part = "input" if ".embed_tokens." in name else "head" if name.startswith("lm_head.") else "blocks"
        counts[part] += int(torch.Size(shape).numel())
    dtype_counts: dict[str, int] = {}
    for dtype in dtypes.values():
        label = str(dtype).removeprefix("torch.")
        dtype_counts[label] = dtype_counts.get(label, 0) + 1
    configured = quantization_configured(config)
    layers = {layer_of(name) for name in expected}
    quantized = sorted({layer_of(name) for name in found if name not in expected and layer_of(name) in layers}
                       if configured else set())
    problems = [problem for name in found if layer_of(name) not in quantized
                and (problem := tensor_problem(name, found[name], dtypes[name], expected, configured))]
    problems += missing_tensors(expected, found, lambda name: layer_of(name) in quantized)
    return TensorReport(config, counts["input"], counts["blocks"], counts["head"], dtype_counts, problems,
                        quantized)


def load_config(checkpoint_dir: str | Path) -> FMBCConfig:
    """The checkpoint's FMBCConfig, with a clear error if the folder is not an FMBC checkpoint."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has no config.json")
    model_type = json.loads(path.read_text()).get("model_type")
    if model_type != FMBCConfig.model_type:
        raise CheckpointError(f"{path}: model_type is {model_type!r}, expected {FMBCConfig.model_type!r}: not an "
                              "fmbc-serve checkpoint (fmbc import converts one of the FMBC family)")
    return FMBCConfig.from_pretrained(str(checkpoint_dir))
