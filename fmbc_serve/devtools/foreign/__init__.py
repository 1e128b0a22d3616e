"""Foreign FMBC-family checkpoints, written at run time, for `fmbc import`'s tests and its benchmark.

Each style folder here is someone else's code: its own configuration and modeling files, its own names and
conventions. `write_foreign` copies them into a folder with random weights (seeded) and a character tokenizer, as
a published checkpoint would be laid out, its weights stored as people publish them (safetensors, sharded
safetensors with an index, or a `pytorch_model.bin`; float32, bfloat16 or float16); only `trust_remote_code=True`
loads it.
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
# How the tokenizer ships: a character tokenizer.json, a sentencepiece tokenizer.model alone (without or, as Llama's,
# with byte-fallback pieces), or code of its own.
TOKENIZERS = ("char", "sentencepiece", "sentencepiece-bytes", "own-code")


def write_foreign(style: str, out: Path, seed: int = 0, chat_template: bool = True, weights: str = "safetensors",
                  dtype: torch.dtype = torch.float32, tokenizer: str = "char", **config_fields) -> str:
    """A foreign checkpoint of `style` in `out` (config fields override the style's defaults), its weights in
    `dtype` and one of WEIGHT_FORMATS, its tokenizer one of TOKENIZERS."""
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
    if tokenizer.startswith("sentencepiece"):
        write_sentencepiece_tokenizer(out, config.vocab_size, byte_fallback=tokenizer == "sentencepiece-bytes")
        return str(out)
    char_tokenizer = build_char_tokenizer(config.vocab_size)
    if not chat_template:
        char_tokenizer.chat_template = None
    char_tokenizer.save_pretrained(out)
    if tokenizer == "own-code":
        shutil.copyfile(FOREIGN / "tokenizers" / "tokenization_char.py", out / "tokenization_char.py")
        settings = json.loads((out / "tokenizer_config.json").read_text())
        settings.update(tokenizer_class="CharTokenizer", auto_map={"AutoTokenizer": [None,
                                                                                    "tokenization_char.CharTokenizer"]})
        (out / "tokenizer_config.json").write_text(json.dumps(settings))
    return str(out)


def write_sentencepiece_tokenizer(out: Path, vocab_size: int, byte_fallback: bool = False) -> None:
    """A Llama-style tokenizer of exactly `vocab_size` pieces that ships as a sentencepiece `tokenizer.model` only
    (no tokenizer.json), trained here on the styles' own source files, which travel with this module wherever it
    is installed (BPE on one thread: deterministic). With `byte_fallback`, 256 of the pieces are bytes
    (`<0x00>`...), as in Llama's tokenizer: a character outside the vocabulary becomes its UTF-8 bytes."""
    import sentencepiece

    text = "\n".join(path.read_text() for path in sorted(FOREIGN.glob("*/*.py")))
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, num_threads=1, byte_fallback=byte_fallback,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2)
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>",
                                                           "eos_token": "</s>", "unk_token": "<unk>"}))
