"""Session-wide setup and fixtures. Tiny checkpoints are made by the project's own code; nothing is downloaded.

Layout: unit/ (no engine: code, config, reference model, kernel, importer, CLI), engines/ (the real vLLM and
SGLang, marked `vllm` / `sglang`, each run in its engine's environment), deploy/ (images and manifests, checked
without Docker or a cluster). Helpers shared between test files live in support/ (importable as `support`);
those the scripts use too, in `fmbc_serve.devtools`.
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
    from fmbc_serve.checkpoint import init_checkpoint, make_config
    from fmbc_serve.configuration_fmbc import INPUT_MODES

    root = tmp_path_factory.mktemp("tiny")
    return {
        mode: str(init_checkpoint(make_config("tiny", input_mode=mode), root / mode, seed=0))
        for mode in INPUT_MODES
    }


@pytest.fixture(scope="session")
def parallel_block_checkpoints(tmp_path_factory) -> dict[str, str]:
    """One float32 `tiny` checkpoint per parallel block style (GPT-NeoX's, GPT-J's), with non-trivial norms and
    biases: {"parallel": dir, "parallel_shared_norm": dir}."""
    from support.checkpoints import PARALLEL_BLOCK_STYLES, write_parallel_block_checkpoint

    root = tmp_path_factory.mktemp("parallel-blocks")
    return {style: write_parallel_block_checkpoint(root / style, style) for style in PARALLEL_BLOCK_STYLES}
