"""Check the fused code + norm kernel on a GPU against its reference, then benchmark it.

    python scripts/gpu_kernel_check.py              # CUDA machine: needs only torch and triton, no install
    python scripts/gpu_kernel_check.py --interpret  # CPU, TRITON_INTERPRET=1, tiny sizes: proves it runs

Without CUDA it falls back to --interpret. Part 1 compares kernel and reference over a grid of codes, norms,
dtypes and both statistics variants, then checks the custom op under torch.compile and (CUDA) inside a
CUDA graph. Part 2 times token counts T at d = 1024, bf16, V = 65536 against a device-to-device copy, the
unfused torch path (BinaryCode.embed then layer_norm) and a learned nn.Embedding + LayerNorm. Exits 1 if a
check fails. "wall" times include the Python launch; "device" times replay a CUDA graph of the call (on CPU
they are wall times too). GB/s and the closed-form-vs-reduction speedup use device times.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-5
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = tuple(TOLERANCE)


def load_module(name: str, init_file: Path) -> ModuleType:
    """Import a file of the repo under `name` (a package when it is an __init__.py) without installing."""
    package_dir = [str(init_file.parent)] if init_file.name == "__init__.py" else None
    spec = importlib.util.spec_from_file_location(name, init_file, submodule_search_locations=package_dir)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_project() -> tuple[ModuleType, ModuleType]:
    """(binary_code, fmbc_kernels) from this checkout. Call after TRITON_INTERPRET is settled."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        from fmbc_serve import binary_code
    except ImportError:  # fmbc_serve/__init__ imports transformers; binary_code.py alone needs only torch
        binary_code = load_module("fmbc_binary_code", REPO_ROOT / "fmbc_serve" / "binary_code.py")
    # kernels/ installs as fmbc_kernels (pyproject package-dir); import it from the tree under that name.
    return binary_code, load_module("fmbc_kernels", REPO_ROOT / "kernels" / "__init__.py")


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


class Checker:
    """Runs named checks, prints one line each, and remembers failures."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, name: str, run: Callable[[], None]) -> None:
        try:
            run()
        except Exception as err:  # report every failing case, not just the first
            self.failures.append(name)
            print(f"FAIL  {name}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        else:
            print(f"ok    {name}")


def run_checks(binary_code: ModuleType, kernels: ModuleType, device: torch.device, interpret: bool) -> list[str]:
    BinaryCode, random_affine = binary_code.BinaryCode, binary_code.random_affine
    checker = Checker()
    widths = (64, 100) if interpret else (64, 1000, 4096)
    num_tokens = 20 if interpret else 777
    generator = torch.Generator().manual_seed(0)

    def compare(code, dtype: torch.dtype, layer_norm: bool, closed_form: bool) -> None:
        ids = torch.randint(0, code.vocab_size, (num_tokens,), generator=generator)
        ids[:2] = torch.tensor([0, code.vocab_size - 1])
        ids = ids.to(device)
        weight = (1 + 0.5 * torch.randn(code.width, generator=generator)).to(device, dtype)
        bias = (0.5 * torch.randn(code.width, generator=generator)).to(device, dtype) if layer_norm else None
        got = kernels.fused_code_norm(ids, code, weight, bias, EPS, dtype, closed_form=closed_form)
        expected = kernels.reference_code_norm(ids, code, weight, bias, EPS, dtype)
        torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], expected[1], rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])

    grid = itertools.product((1, 9, 16, 24), widths, ("repeat", "interleave"))
    for case, (num_bits, width, layout) in enumerate(grid):
        rows, bias = random_affine(num_bits, seed=case) if case % 2 else (None, 0)
        try:
            code = BinaryCode(2**num_bits, width, bit_order=("lsb", "msb")[case // 2 % 2],
                              values=("zero_one", "sign")[case // 4 % 2], scale=(1.0, 0.37)[case // 3 % 2],
                              layout=layout, affine_rows=None if rows is None else tuple(rows), affine_bias=bias)
        except ValueError:  # interleave that would truncate away a bit: the code itself refuses it
            continue
        dtype = DTYPES[case % 3]
        for layer_norm, closed_form in itertools.product((True, False), (True, False)):
            name = (f"K={num_bits:<2} d={width:<4} {layout:<10} affine={rows is not None!s:<5} {dtype} "
                    f"{'layernorm' if layer_norm else 'rmsnorm':<9} {'closed' if closed_form else 'reduction'}")
            checker.check(name, functools.partial(compare, code, dtype, layer_norm, closed_form))

    code = BinaryCode(65536, 256, values="sign", scale=0.5)
    weight = torch.randn(256, device=device, dtype=torch.bfloat16)
    bias = torch.randn(256, device=device, dtype=torch.bfloat16)
    static_ids = torch.randint(0, 65536, (64,), device=device)

    def embed_and_norm() -> tuple[torch.Tensor, torch.Tensor]:
        return kernels.fused_code_norm(static_ids, code, weight, bias, EPS, torch.bfloat16, check_ids=False)

    def compiled_matches_eager() -> None:
        backend = "aot_eager" if interpret else "inductor"
        compiled = torch.compile(embed_and_norm, backend=backend, fullgraph=True)
        for got, expected in zip(compiled(), embed_and_norm(), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)

    def cuda_graph_matches_eager() -> None:
        embed_and_norm()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = embed_and_norm()
        static_ids.copy_(torch.randint(0, 65536, (64,), device=device))
        graph.replay()
        for got, expected in zip(captured, embed_and_norm(), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)

    checker.check(f"torch.compile(fullgraph, {'aot_eager' if interpret else 'inductor'}) == eager",
                  compiled_matches_eager)
    if device.type == "cuda":
        checker.check("CUDA graph capture + replay with new ids == eager", cuda_graph_matches_eager)
    else:
        print("skip  CUDA graph capture (no CUDA)")
    return checker.failures


def copy_bandwidth_gbs(device: torch.device, num_bytes: int, min_seconds: float) -> float:
    """Device-to-device copy: bytes read + bytes written per second, the practical bandwidth ceiling."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * num_bytes / time_us(lambda: target.copy_(source), device, min_seconds) / 1e3


def run_benchmark(binary_code: ModuleType, kernels: ModuleType, device: torch.device, interpret: bool) -> None:
    vocab_size, width, dtype = 65536, (128 if interpret else 1024), torch.bfloat16
    token_counts = (1, 64) if interpret else (1, 64, 1024, 16384, 65536)
    min_seconds = 0.02 if interpret else 0.2
    code = binary_code.BinaryCode(vocab_size, width)
    weight = torch.randn(width, device=device, dtype=dtype)
    bias = torch.randn(width, device=device, dtype=dtype)
    table = torch.nn.Embedding(vocab_size, width, device=device, dtype=dtype)
    copy_gbs = copy_bandwidth_gbs(device, (1 << 22) if interpret else (1 << 30), min_seconds)
    device_timer = graph_time_us if device.type == "cuda" else time_us  # kernel time without Python launch
    print(f"\nbenchmark: V={vocab_size} (K={code.num_bits}) d={width} {dtype} layernorm, "
          f"{code.layout}; copy bandwidth {copy_gbs:.1f} GB/s; times in us per call")
    columns = ("T", "fused wall", "fused device", "GB/s", "% copy", "reduction device", "closed speedup",
               "unfused wall", "speedup vs unfused", "learned wall", "speedup vs learned")
    column_widths = [max(len(column), 9) for column in columns]
    print(" | ".join(column.rjust(size) for column, size in zip(columns, column_widths, strict=True)))
    with torch.inference_mode():
        for num_tokens in token_counts:
            ids = torch.randint(0, vocab_size, (num_tokens,), device=device)

            def fused(closed_form: bool = True, ids: torch.Tensor = ids) -> object:
                return kernels.fused_code_norm(ids, code, weight, bias, EPS, dtype, check_ids=False,
                                               closed_form=closed_form)

            def unfused(ids: torch.Tensor = ids) -> object:
                residual = code.embed(ids, dtype, check=False)
                return residual, F.layer_norm(residual, (width,), weight, bias, EPS)

            def learned(ids: torch.Tensor = ids) -> object:
                residual = table(ids)
                return residual, F.layer_norm(residual, (width,), weight, bias, EPS)

            fused_us = time_us(fused, device, min_seconds)
            device_us = device_timer(fused, device, min_seconds)
            reduction_us = device_timer(functools.partial(fused, closed_form=False), device, min_seconds)
            unfused_us = time_us(unfused, device, min_seconds)
            learned_us = time_us(learned, device, min_seconds)
            num_bytes = ids.numel() * ids.element_size() + 2 * num_tokens * width * dtype.itemsize + \
                2 * width * dtype.itemsize
            gbs = num_bytes / device_us / 1e3
            row = (f"{num_tokens}", f"{fused_us:.1f}", f"{device_us:.1f}", f"{gbs:.1f}",
                   f"{100 * gbs / copy_gbs:.0f}%", f"{reduction_us:.1f}", f"{reduction_us / device_us:.2f}x",
                   f"{unfused_us:.1f}", f"{unfused_us / fused_us:.2f}x", f"{learned_us:.1f}",
                   f"{learned_us / fused_us:.2f}x")
            print(" | ".join(value.rjust(size) for value, size in zip(row, column_widths, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interpret", action="store_true",
                        help="run on CPU under the Triton interpreter with tiny sizes (automatic without CUDA)")
    interpret = parser.parse_args().interpret or not torch.cuda.is_available()
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    device = torch.device("cpu" if interpret else "cuda")
    binary_code, kernels = load_project()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU (Triton interpreter)'}"
          f"; torch {torch.__version__}")
    started = time.perf_counter()
    failures = run_checks(binary_code, kernels, device, interpret)
    print(f"\n{'all checks passed' if not failures else f'{len(failures)} checks FAILED'} "
          f"({time.perf_counter() - started:.1f} s)")
    run_benchmark(binary_code, kernels, device, interpret)
    print(f"\ntotal {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
