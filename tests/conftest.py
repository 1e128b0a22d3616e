"""Session-wide setup and fixtures. Tiny checkpoints are made by the project's own code; nothing is downloaded.

Layout: unit/ (no engine: code, config, reference model, kernel, importer, CLI), engines/ (the real vLLM and
SGLang, marked `vllm` / `sglang`, each run in its engine's environment), deploy/ (images and manifests, checked
without Docker or a cluster). Helpers shared between files live in support/ (importable as `support`).
"""

from __future__ import annotations

import os

import pytest
import torch

# Without CUDA the Triton kernel runs under the interpreter, which must be chosen before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """One float32 `tiny` checkpoint per input mode: {"binary": dir, "affine": dir, "learned": dir}."""
    from support.checkpoints import INPUT_MODES

    from fmbc_serve.checkpoint import init_checkpoint, make_config

    root = tmp_path_factory.mktemp("tiny")
    return {
        mode: str(init_checkpoint(make_config("tiny", input_mode=mode), root / mode, seed=0))
        for mode in INPUT_MODES
    }


@pytest.fixture(scope="session")
def house_style_checkpoints(tmp_path_factory) -> dict[str, str]:
    """One float32 `tiny` checkpoint per parallel block style (GPT-NeoX's, GPT-J's), with non-trivial norms and
    biases: {"parallel": dir, "parallel_shared_norm": dir}."""
    from support.checkpoints import HOUSE_STYLES, write_house_style

    root = tmp_path_factory.mktemp("house")
    return {style: write_house_style(root / style, style) for style in HOUSE_STYLES}
