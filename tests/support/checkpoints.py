"""What the suites build their checkpoints with: seeded code options, PEFT adapters, the parallel block styles."""

from __future__ import annotations

from pathlib import Path

import torch

# PEFT target modules: every projection for vLLM; SGLang's LoRA reads `up_proj` as half of a gated MLP.
LORA_TARGETS = {"vllm": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                "sglang": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}


def scrambled_lift_map(num_bits: int, width: int) -> tuple[int, ...]:
    """A seeded `map`-layout lift that uses every bit, in neither tiled nor interleaved order."""
    generator = torch.Generator().manual_seed(width)
    rest = torch.randint(0, num_bits, (width - num_bits,), generator=generator)
    positions = torch.cat([torch.arange(num_bits), rest])
    return tuple(positions[torch.randperm(width, generator=generator)].tolist())


def make_lora_adapter(checkpoint: str, out_dir: str | Path, seed: int, targets: list[str], rank: int = 8) -> str:
    """A PEFT LoRA adapter on `targets` of the reference, with random (non-zero) A and B, so that it visibly
    changes the model; saved as PEFT saves it. Returns its directory."""
    from peft import LoraConfig, get_peft_model

    from fmbc_serve.modeling_fmbc import FMBCForCausalLM

    torch.manual_seed(seed)
    model = FMBCForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets,
                        init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out_dir))
    return str(out_dir)


# The GPT-NeoX / Pythia and GPT-J parallel blocks as FMBC checkpoints: block style -> config fields over the
# `tiny` preset.
PARALLEL_BLOCK_STYLES = {
    "parallel": {"block_style": "parallel", "attention_bias": True, "mlp_bias": True,
                 "partial_rotary_factor": 0.5},
    "parallel_shared_norm": {"block_style": "parallel_shared_norm", "mlp_bias": True, "lm_head_bias": True,
                             "partial_rotary_factor": 0.25, "hidden_act": "gelu_tanh"},
}


def write_parallel_block_checkpoint(out: Path, style: str, seed: int = 0) -> str:
    """A tiny checkpoint of a parallel block style whose norms and biases are far from their initial 1 and 0 (so
    that a bias or norm an engine dropped shows in its logits)."""
    from fmbc_serve.checkpoint import make_config, save_checkpoint
    from fmbc_serve.modeling_fmbc import FMBCForCausalLM
    from fmbc_serve.tokenizer import build_char_tokenizer

    torch.manual_seed(seed)
    config = make_config("tiny", **PARALLEL_BLOCK_STYLES[style])
    model = FMBCForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    save_checkpoint(model, build_char_tokenizer(config.vocab_size), out)
    return str(out)
