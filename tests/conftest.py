"""Shared fixtures. Tiny checkpoints are made by the project's own code; nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

# Without CUDA the Triton kernel runs under the interpreter, which must be chosen before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

INPUT_MODES = ("binary", "affine", "learned")


def require(module: str):
    """Import an engine module; in the engine's own CI run (FMBC_REQUIRE_ENGINE=1) a missing engine fails
    the run instead of skipping it."""
    if os.environ.get("FMBC_REQUIRE_ENGINE") == "1":
        return __import__(module)
    return pytest.importorskip(module)


def scrambled_lift_map(num_bits: int, width: int) -> tuple[int, ...]:
    """A seeded `map`-layout lift that uses every bit, in neither tiled nor interleaved order."""
    generator = torch.Generator().manual_seed(width)
    rest = torch.randint(0, num_bits, (width - num_bits,), generator=generator)
    positions = torch.cat([torch.arange(num_bits), rest])
    return tuple(positions[torch.randperm(width, generator=generator)].tolist())


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """One float32 `tiny` checkpoint per input mode: {"binary": dir, "affine": dir, "learned": dir}."""
    from fmbc_serve.checkpoint import init_checkpoint, make_config

    root = tmp_path_factory.mktemp("tiny")
    return {
        mode: str(init_checkpoint(make_config("tiny", input_mode=mode), root / mode, seed=0))
        for mode in INPUT_MODES
    }


def assert_parity_command_passes(checkpoint: str, engine: str) -> None:
    """Run the user-facing `fmbc parity DIR --engine ENGINE` as users do and require a PASS."""
    import subprocess
    import sys
    from pathlib import Path

    fmbc = str(Path(sys.executable).parent / "fmbc")
    result = subprocess.run([fmbc, "parity", checkpoint, "--engine", engine, "--max-new-tokens", "8"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"{engine}: greedy tokens all equal" in result.stdout and "PASS" in result.stdout


# PEFT target modules: every projection for vLLM; SGLang's LoRA reads `up_proj` as half of a gated MLP.
LORA_TARGETS = {"vllm": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                "sglang": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}


def make_lora_adapter(checkpoint: str, out_dir, seed: int, targets: list[str], rank: int = 8) -> str:
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
