"""The benchmark's shapes and models, and their random checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ...checkpoint import PRESETS, init_checkpoint, make_config
from ...serve import DEFAULT_MODEL
from ...tokenizer import build_char_tokenizer

# The default round order puts FMBC next to its twin and next to its second server.
MODELS = ("learned", "fmbc", "fmbc-again", "stock")
# The FMBC checkpoint on the engine's Transformers backend, without our plugin (what the plugin gains); not in the
# default rounds: `--models fmbc fmbc-transformers fmbc-again`.
TRANSFORMERS_BACKEND = "fmbc-transformers"
# The noise floor (a second server of the very same checkpoint), and the backend's server of it.
SAME_CHECKPOINT = {"fmbc-again": "fmbc", TRANSFORMERS_BACKEND: "fmbc"}
DIMENSIONS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings")


def _dimensions(config: dict) -> dict[str, int]:
    return {name: config[name] for name in DIMENSIONS}


# name -> (the config's dimensions, dtype): cpu is the embedded default model's shape, gpu the paper's, tiny the
# smallest that the engines' CPU attention takes (head size 32), for a smoke run.
SHAPES: dict[str, tuple[dict[str, int], str]] = {
    "tiny": (_dimensions(PRESETS["tiny"]), "float32"),
    "cpu": (_dimensions(json.loads((DEFAULT_MODEL / "config.json").read_text())), "float32"),
    "gpu": (_dimensions(PRESETS["paper"]), "bfloat16"),
}


def write_checkpoints(root: Path, shape: str, models: list[str]) -> dict[str, str]:
    """FMBC, its learned twin and a stock GPT-NeoX of the same shape, as `models` need them (random weights, seed 0,
    character tokenizer); fmbc-again gets the FMBC folder itself."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    dims, dtype = SHAPES[shape]
    needed = {SAME_CHECKPOINT.get(model, model) for model in models}
    paths = {}
    for name, mode in (("fmbc", "binary"), ("learned", "learned")):
        if name in needed:
            config = make_config("tiny", input_mode=mode, **dims)
            paths[name] = str(init_checkpoint(config, root / name, seed=0, dtype=getattr(torch, dtype)))
    if "stock" in needed:
        tokenizer = build_char_tokenizer(dims["vocab_size"])
        stock = GPTNeoXConfig(**dims, hidden_act="gelu", rotary_pct=1.0, rope_theta=10000.0, layer_norm_eps=1e-5,
                              use_parallel_residual=False, tie_word_embeddings=False,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        GPTNeoXForCausalLM(stock).to(getattr(torch, dtype)).save_pretrained(root / "stock")
        tokenizer.save_pretrained(root / "stock")
        paths["stock"] = str(root / "stock")
    return {model: paths[SAME_CHECKPOINT.get(model, model)] for model in models}
