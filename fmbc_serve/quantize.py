"""Quantized FMBC checkpoints in the compressed-tensors format (which vLLM loads natively), made by
llm-compressor's own `oneshot` with a round-to-nearest `QuantizationModifier`.

This module is only glue: load the reference model, let llm-compressor quantize every `Linear` but the output head
(a fixed-code input has no table to quantize), and save with llm-compressor's `save_compressed` plus our tokenizer,
generation config and remote-code files. llm-compressor pins an older transformers and compressed-tensors than the
engines, so it runs in an environment of its own (`bash scripts/venv.sh quant`, docs/quantization.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

# The llm-compressor schemes offered: both are data-free. W8A8: int8 weights per output channel, int8 activations
# per token, dynamic (vLLM's CPU int8 GEMM, any serving dtype). W4A16: int4 weights in groups of 128 (vLLM's CPU
# WNA16 kernel, bfloat16/float16 serving only).
SCHEMES = ("W8A8", "W4A16")
MISSING_TOOL = ("fmbc quantize needs llm-compressor, which pins another transformers than the engines: run it from "
                "an environment of its own, made by `bash scripts/venv.sh quant` or `pip install "
                "'fmbc-serve[quantize]'` in a fresh virtual environment")


def quantize_checkpoint(source: str | Path, target: str | Path, scheme: str = "W8A8") -> Path:
    """Write a compressed-tensors copy of the FMBC checkpoint `source` to `target`; return `target`.
    Raises ModuleNotFoundError (with MISSING_TOOL) where llm-compressor is not installed."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    try:
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(MISSING_TOOL) from err
    from transformers import AutoTokenizer

    from .checkpoint import save_checkpoint
    from .modeling_fmbc import FMBCForCausalLM

    model = FMBCForCausalLM.from_pretrained(source, dtype=torch.float32)
    # No dataset: weights get round-to-nearest scales and W8A8's activation scales are computed per token at run time.
    oneshot(model=model, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    # oneshot replaced model.save_pretrained by llm-compressor's, which compresses the weights (save_compressed)
    # and writes quantization_config into config.json; save_checkpoint adds our tokenizer and remote-code files.
    return save_checkpoint(model, AutoTokenizer.from_pretrained(source), target)
