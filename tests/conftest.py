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
