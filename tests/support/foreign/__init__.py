"""Foreign FMBC-family checkpoints for the importer tests, written at test time.

Each style in tests/support/foreign/ is someone else's code: its own configuration and modeling files, its own
names and conventions. `write_foreign` copies them into a folder with random weights (seeded) and a character
tokenizer, as a published checkpoint would be laid out, its weights stored as people publish them (safetensors,
sharded safetensors with an index, or a `pytorch_model.bin`; float32, bfloat16 or float16); only
`trust_remote_code=True` loads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

FOREIGN = Path(__file__).parent
# style -> (folder, model_type, config class, model class)
STYLES = {
    "nanogpt": ("nanogpt_style", "nano_fmbc", "configuration_nano.NanoFMBCConfig", "modeling_nano.NanoFMBCForCausalLM"),
    "meta": ("meta_style", "meta_fmbc", "configuration_meta.MetaFMBCConfig", "modeling_meta.MetaFMBCForCausalLM"),
    "neox": ("neox_style", "neox_fmbc", "configuration_neox.NeoxFMBCConfig", "modeling_neox.NeoxFMBCForCausalLM"),
    "pythia": ("pythia_style", "pythia_fmbc", "configuration_pythia.PythiaFMBCConfig",
               "modeling_pythia.PythiaFMBCForCausalLM"),
    "gptj": ("gptj_style", "gptj_fmbc", "configuration_gptj.GPTJFMBCConfig", "modeling_gptj.GPTJFMBCForCausalLM"),
}
WEIGHT_FORMATS = ("safetensors", "sharded", "bin")


def write_foreign(style: str, out: Path, seed: int = 0, chat_template: bool = True, weights: str = "safetensors",
                  dtype: torch.dtype = torch.float32, **config_fields) -> str:
    """A foreign checkpoint of `style` in `out` (config fields override the style's defaults), its weights in
    `dtype` and one of WEIGHT_FORMATS."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fmbc_serve.tokenizer import build_char_tokenizer

    folder, model_type, config_class, model_class = STYLES[style]
    out.mkdir(parents=True)
    for source in (FOREIGN / folder).glob("*.py"):
        shutil.copyfile(source, out / source.name)
    auto_map = {"AutoConfig": config_class, "AutoModelForCausalLM": model_class}
    (out / "config.json").write_text(json.dumps({"model_type": model_type, "auto_map": auto_map,
                                                 "architectures": [model_class.split(".")[1]], **config_fields}))
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True).to(dtype)
    model.save_pretrained(out, max_shard_size="64KB" if weights == "sharded" else "50GB")
    if weights == "bin":  # transformers writes safetensors only; a pickle as older checkpoints have it
        for path in out.glob("model*.safetensors"):
            path.unlink()
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    tokenizer = build_char_tokenizer(config.vocab_size)
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(out)
    return str(out)
