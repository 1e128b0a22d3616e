"""Quantized FMBC checkpoints in the compressed-tensors format, which vLLM loads natively.

The weights are rounded to the nearest grid point (no calibration data: the schemes here quantize
weights statically and activations, if at all, dynamically per token), and compressed-tensors itself attaches
the scheme, packs the tensors and writes `quantization_config` into config.json, as llm-compressor's
round-to-nearest `QuantizationModifier` does. The output head stays in full precision (`ignore=["lm_head"]`),
and a fixed-code input has no table to quantize. compressed-tensors comes with vLLM; llm-compressor itself
pins an older transformers than the engines (see docs/quantization.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

# compressed-tensors preset -> the format it is saved in. W8A8: int8 weights per output channel and int8
# activations per token, dynamic (vLLM's CPU int8 GEMM, any serving dtype). W4A16: int4 weights in groups of 128,
# packed into int32 (vLLM's CPU WNA16 kernel, bfloat16/float16 serving only).
SCHEMES = {"W8A8": "int-quantized", "W4A16": "pack-quantized"}


def weight_qparams(weight: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest scale and zero point of a [out, in] weight for the scheme's weight arguments."""
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams

    if args.strategy == QuantizationStrategy.GROUP:
        weight = weight.reshape(weight.shape[0], -1, args.group_size)
    elif args.strategy != QuantizationStrategy.CHANNEL:
        raise ValueError(f"weight strategy {args.strategy} is not supported here")
    return calculate_qparams(weight.amin(dim=-1), weight.amax(dim=-1), args)


def quantize_checkpoint(source: str | Path, target: str | Path, scheme: str = "W8A8") -> Path:
    """Write a compressed-tensors copy of the FMBC checkpoint `source` to `target`; return `target`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )
    from transformers import AutoTokenizer

    from .checkpoint import save_checkpoint
    from .modeling_fmbc import FMBCForCausalLM

    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    model = FMBCForCausalLM.from_pretrained(source, dtype=torch.float32)
    config = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(scheme, ["Linear"])},
                                ignore=["lm_head"], quantization_status=QuantizationStatus.FROZEN)
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            if getattr(module, "quantization_scheme", None) is None:
                continue
            scale, zero_point = weight_qparams(module.weight, module.quantization_scheme.weights)
            module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.copy_(zero_point.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=SCHEMES[scheme])
    compressor.compress_model(model)
    out = save_checkpoint(model, AutoTokenizer.from_pretrained(source), target)
    compressor.update_config(str(out))
    return out
