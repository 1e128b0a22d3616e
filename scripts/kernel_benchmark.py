"""Time the fused code + norm kernel against a copy, the unfused torch path and a learned table.

    python scripts/kernel_benchmark.py     # CUDA: the paper's V and d, bf16, T up to 65,536 tokens
                                           # no CUDA: tiny sizes under the Triton interpreter (proves it runs)

Correctness is tests/unit/test_kernel.py's job (it runs on CUDA when present); a GPU check is both, in order:
`python -m pytest tests/unit/test_kernel.py && python scripts/kernel_benchmark.py` (see docs/kernel.md). Ids and norm
parameters are the test's own (`fmbc_serve.devtools.kernel_inputs`). "wall" times include the Python launch;
"device" times replay a CUDA graph of the call (on CPU they are wall times too). GB/s and the
closed-form-vs-reduction speedup use device times.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import fmbc_kernels  # noqa: E402

from fmbc_serve.binary_code import BinaryCode  # noqa: E402
from fmbc_serve.checkpoint import PRESETS  # noqa: E402
from fmbc_serve.devtools.kernel_inputs import DEVICE, EPS, boundary_ids, norm_params  # noqa: E402

INTERPRET = DEVICE.type == "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_us(fn: Callable[[], object], device: torch.device, min_seconds: float) -> float:
    """Mean wall time per call of back-to-back calls, after one warm-up call, growing the count to min_seconds."""
    fn()
    synchronize(device)
    iterations = 1
    while True:
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds or iterations >= 1 << 16:
            return elapsed / iterations * 1e6
        iterations *= 4


def graph_time_us(fn: Callable[[], object], device: torch.device, min_seconds: float) -> float:
    """Device time per call: `fn` captured once into a CUDA graph and replayed."""
    fn()  # builds cached tables outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_us(graph.replay, device, min_seconds)


def copy_bandwidth_gbs(device: torch.device, num_bytes: int, min_seconds: float) -> float:
    """Device-to-device copy: bytes read + bytes written per second, the practical bandwidth ceiling."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * num_bytes / time_us(lambda: target.copy_(source), device, min_seconds) / 1e3


def main() -> None:
    paper = PRESETS["paper"]
    vocab_size, width, dtype = paper["vocab_size"], (128 if INTERPRET else paper["hidden_size"]), torch.bfloat16
    token_counts = (1, 64) if INTERPRET else (1, 64, 1024, 16384, 65536)
    min_seconds = 0.02 if INTERPRET else 0.2
    code = BinaryCode(vocab_size, width)
    weight, bias = (t.to(dtype) for t in norm_params(width, torch.float32, layer_norm=True, seed=0))
    table = torch.nn.Embedding(vocab_size, width, device=DEVICE, dtype=dtype)
    copy_gbs = copy_bandwidth_gbs(DEVICE, (1 << 22) if INTERPRET else (1 << 30), min_seconds)
    device_timer = time_us if INTERPRET else graph_time_us  # kernel time without the Python launch
    name = "CPU (Triton interpreter)" if INTERPRET else torch.cuda.get_device_name(DEVICE)
    print(f"device: {name}; torch {torch.__version__}")
    print(f"benchmark: V={vocab_size} (K={code.num_bits}) d={width} {dtype} layernorm, "
          f"{code.layout}; copy bandwidth {copy_gbs:.1f} GB/s; times in us per call")
    columns = ("T", "fused wall", "fused device", "GB/s", "% copy", "reduction device", "closed speedup",
               "unfused wall", "speedup vs unfused", "learned wall", "speedup vs learned")
    column_widths = [max(len(column), 9) for column in columns]
    print(" | ".join(column.rjust(size) for column, size in zip(columns, column_widths, strict=True)))
    with torch.inference_mode():
        for num_tokens in token_counts:
            ids = boundary_ids(code, num_tokens, seed=num_tokens)

            def fused(closed_form: bool = True, ids: torch.Tensor = ids) -> object:
                return fmbc_kernels.fused_code_norm(ids, code, weight, bias, EPS, dtype, check_ids=False,
                                                    closed_form=closed_form)

            def unfused(ids: torch.Tensor = ids) -> object:
                residual = code.embed(ids, dtype, check=False)
                return residual, F.layer_norm(residual, (width,), weight, bias, EPS)

            def learned(ids: torch.Tensor = ids) -> object:
                residual = table(ids)
                return residual, F.layer_norm(residual, (width,), weight, bias, EPS)

            fused_us = time_us(fused, DEVICE, min_seconds)
            device_us = device_timer(fused, DEVICE, min_seconds)
            reduction_us = device_timer(functools.partial(fused, closed_form=False), DEVICE, min_seconds)
            unfused_us = time_us(unfused, DEVICE, min_seconds)
            learned_us = time_us(learned, DEVICE, min_seconds)
            num_bytes = ids.numel() * ids.element_size() + 2 * num_tokens * width * dtype.itemsize + \
                2 * width * dtype.itemsize
            gbs = num_bytes / device_us / 1e3
            row = (f"{num_tokens}", f"{fused_us:.1f}", f"{device_us:.1f}", f"{gbs:.1f}",
                   f"{100 * gbs / copy_gbs:.0f}%", f"{reduction_us:.1f}", f"{reduction_us / device_us:.2f}x",
                   f"{unfused_us:.1f}", f"{unfused_us / fused_us:.2f}x", f"{learned_us:.1f}",
                   f"{learned_us / fused_us:.2f}x")
            print(" | ".join(value.rjust(size) for value, size in zip(row, column_widths, strict=True)))


if __name__ == "__main__":
    main()
