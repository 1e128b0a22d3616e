"""Compile the code + norm kernel ahead of time for NVIDIA GPUs, on a machine without one, and read the result.

    python -m fmbc_kernels.compile_report             # the launch configs, as docs/kernel.md's table
    python -m fmbc_kernels.compile_report --sweep     # every tile/warp candidate: the evidence for launch_config
    python -m fmbc_kernels.compile_report --json out.json --arch 90 --width 1024 --dtype bfloat16

Triton compiles for any CUDA target with its own bundled ptxas; `cuobjdump` (also bundled) then reads registers and
local memory (spills) from the cubin, and the SASS gives the width of the global stores (`STG.E.128` is 128-bit).
The kernel is compiled through the JIT's own path (`JITFunction.warmup`) with the arguments the launcher passes
(`code_norm_triton.kernel_arguments`), so it gets the specialisation a real launch gets: Triton marks pointers
whose address is a multiple of 16 bytes and integers that are multiples of 16 as divisible by 16 (`num_tokens`
is exempt, `do_not_specialize`, so that every token count shares one compiled kernel); torch allocates at
least 64-byte aligned, so every tensor argument is marked. Only the target is chosen here, by a driver that
answers "the current GPU is sm_XX" and is never asked to run anything.

Cannot run under TRITON_INTERPRET=1: the interpreter replaces @triton.jit functions with Python ones.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from itertools import product
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.cache import get_cache_manager
from triton.runtime.driver import driver

from fmbc_serve.binary_code import BinaryCode, random_affine

from .code_norm_triton import (
    MAX_ROWS_PER_PROGRAM,
    MAX_WARPS,
    LaunchConfig,
    code_norm_kernel,
    kernel_arguments,
    launch_config,
)

# The targets the check compiles for: Ampere (A100), Hopper (H100, H200), Blackwell (B200).
ARCHES = (80, 90, 100)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# (width, vocab size): the paper's model, the embedded default model (fmbc_serve/default_model/config.json), a
# width that is not a multiple of 16 but of 8, and an odd one.
SHAPES = {1024: 65536, 256: 4096, 1000: 65536, 1001: 65536}
TOKENS = 64  # any count: num_tokens is not specialised


@dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of one architecture (CUDA programming guide, compute capability table)."""

    max_warps: int = 64  # 2048 threads
    max_blocks: int = 32
    registers: int = 65536
    shared_bytes: int = 228 * 1024
    reserved_shared_per_block: int = 1024


SM_LIMITS = {80: SMLimits(shared_bytes=164 * 1024), 90: SMLimits(), 100: SMLimits()}


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: target, width, output dtype, input variant and launch config."""

    arch: int
    width: int
    dtype: str
    affine: bool
    layer_norm: bool
    block_t: int
    num_warps: int


@dataclass(frozen=True)
class Compiled:
    """What ptxas made of one variant."""

    variant: Variant
    registers: int  # per thread
    local_bytes: int  # local memory per thread, stack frame included: where ptxas spills registers
    local_accesses: int  # LDL/STL instructions in the SASS: spill traffic (0 means none)
    shared_bytes: int  # Triton's dynamic shared memory per program
    store_bits: tuple[int, ...]  # widths of the global stores in the SASS
    warps_per_sm: int  # resident warps per SM allowed by registers, shared memory and the block limits
    compile_seconds: float
    kernel_hash: str  # Triton's cache key: equal hashes mean equal source, specialisation, options and target

    @property
    def occupancy(self) -> float:
        return self.warps_per_sm / SM_LIMITS[self.variant.arch].max_warps


class TargetOnlyDriver:
    """Stands in for Triton's active driver and answers only what `JITFunction.warmup` asks: which target to
    compile for (and a device and stream to key its cache by). It never launches anything."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return self.target.arch  # JITFunction keeps one kernel cache per device: one per target here

    def get_current_stream(self, device: int) -> int:
        return 0


def warps_per_sm(arch: int, registers: int, shared_bytes: int, num_warps: int) -> int:
    """Resident warps per SM, as the CUDA occupancy calculator counts them (registers are allocated per warp in
    units of 256)."""
    limits = SM_LIMITS[arch]
    registers_per_warp = -(-registers * 32 // 256) * 256
    blocks = min(limits.max_blocks, limits.max_warps // num_warps,
                 limits.registers // registers_per_warp // num_warps,
                 limits.shared_bytes // (shared_bytes + limits.reserved_shared_per_block))
    return blocks * num_warps


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _store_bits(sass: str) -> tuple[int, ...]:
    """Widths of the STG instructions: `.128`/`.64` say so, `.U16`/`.S16` are 16-bit, `.U8`/`.S8` 8, else 32."""
    widths = set()
    for modifiers in re.findall(r"\bSTG((?:\.[A-Z0-9_]+)*)", sass):
        parts = modifiers.split(".")
        sizes = [int(part) for part in parts if part in ("64", "128", "256")]
        small = [int(part[1:]) for part in parts if part in ("U8", "S8", "U16", "S16")]
        widths.add((sizes or small or [32])[0])
    return tuple(sorted(widths))


def variant_arguments(variant: Variant, device: torch.device | str = "cpu") -> tuple[tuple[int], tuple, dict]:
    """`kernel_arguments` for a variant: the code of the width's model (V = 65,536 unless SHAPES says otherwise)
    on `device`, TOKENS ids, and the variant's tile and warps."""
    dtype = DTYPES[variant.dtype]
    vocab_size = SHAPES.get(variant.width, 65536)
    num_bits = (vocab_size - 1).bit_length()
    rows, bias = random_affine(num_bits, seed=variant.width) if variant.affine else (None, 0)
    code = BinaryCode(vocab_size, variant.width, affine_rows=None if rows is None else tuple(rows), affine_bias=bias)
    ids = torch.zeros(TOKENS, dtype=torch.int64, device=device)
    weight = torch.ones(variant.width, dtype=dtype, device=device)
    norm_bias = torch.zeros(variant.width, dtype=dtype, device=device) if variant.layer_norm else None
    residual, normed = (torch.empty(TOKENS, variant.width, dtype=dtype, device=device) for _ in range(2))
    config = LaunchConfig(variant.block_t, triton.next_power_of_2(variant.width), variant.num_warps)
    return kernel_arguments(ids, *code.tables().to(device), code.affine_bias, code.low_value, code.high_value, weight,
                            norm_bias, 1e-5, residual, normed, True, config)


def compile_variant(variant: Variant) -> Compiled:
    """Compile one variant through the JIT for its target and read registers, local memory and stores."""
    grid, args, options = variant_arguments(variant)
    driver.set_active(TargetOnlyDriver(variant.arch))
    start = time.perf_counter()
    kernel = code_norm_kernel.warmup(*args, grid=grid, **options)
    seconds = time.perf_counter() - start
    registers, local_bytes, local_accesses, store_bits = inspect_kernel(kernel)
    shared = kernel.metadata.shared
    return Compiled(variant, registers, local_bytes, local_accesses, shared, store_bits,
                    warps_per_sm(variant.arch, registers, shared, variant.num_warps), seconds, kernel.hash)


INSPECTION_FILE = "fmbc-inspection-v1.json"


def inspect_kernel(kernel) -> tuple[int, int, int, tuple[int, ...]]:
    """(registers, local bytes, LDL/STL count, store widths) of a compiled kernel, from cuobjdump. Disassembly
    takes ~0.3 s, so the result is kept beside the kernel in Triton's cache (keyed by the kernel's hash)."""
    cache = get_cache_manager(kernel.hash)
    cached = cache.get_file(INSPECTION_FILE)
    if cached is not None:
        registers, local_bytes, local_accesses, store_bits = json.loads(Path(cached).read_text())
        return registers, local_bytes, local_accesses, tuple(store_bits)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        dump = subprocess.run([_tool("cuobjdump"), "-res-usage", "-sass", cubin.name], capture_output=True,
                              text=True, check=True).stdout
    registers, stack, local = (int(re.search(rf"\b{key}:(\d+)", dump).group(1)) for key in ("REG", "STACK", "LOCAL"))
    result = (registers, stack + local, len(re.findall(r"\b(?:LDL|STL)\b", dump)), _store_bits(dump))
    cache.put(json.dumps(result), INSPECTION_FILE, binary=False)
    return result


def launch_variants(arches=ARCHES, widths=tuple(SHAPES), dtypes=tuple(DTYPES)) -> list[Variant]:
    """Every (target, width, dtype, binary/affine, LayerNorm/RMSNorm) with the launcher's own tile and warps."""
    variants = []
    for arch, width, dtype, affine, layer_norm in product(arches, widths, dtypes, (False, True), (True, False)):
        config = launch_config(width, DTYPES[dtype])
        variants.append(Variant(arch, width, dtype, affine, layer_norm, config.block_t, config.num_warps))
    return variants


def sweep_variants(arches=ARCHES, widths=tuple(SHAPES), dtypes=tuple(DTYPES)) -> list[Variant]:
    """Tile and warp candidates for each (target, width, dtype), on the affine LayerNorm variant (the most work)."""
    return [Variant(arch, width, dtype, True, True, block_t, num_warps)
            for arch, width, dtype in product(arches, widths, dtypes)
            for block_t in (1, 2, 4, 8, 16) for num_warps in (1, 2, 4, 8, 16)]


def neighbour_tiles(block_t: int, num_warps: int) -> list[tuple[int, int]]:
    """(BLOCK_T, warps) next to a launch config's: half and twice the warps, half and twice the rows."""
    tiles = [(block_t, num_warps // 2), (block_t, num_warps * 2), (block_t // 2, num_warps), (block_t * 2, num_warps)]
    return [(rows, warps) for rows, warps in tiles if 1 <= rows <= MAX_ROWS_PER_PROGRAM and 1 <= warps <= MAX_WARPS]


def neighbour_variants(variant: Variant) -> list[Variant]:
    """The variant compiled with each neighbouring tile."""
    return [replace(variant, block_t=rows, num_warps=warps)
            for rows, warps in neighbour_tiles(variant.block_t, variant.num_warps)]


def compile_all(variants: list[Variant], workers: int | None = None) -> list[Compiled]:
    """Compile in parallel processes (each compile is ~0.5 s of one core)."""
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        return list(pool.map(compile_variant, variants))


def _span(values: list[int]) -> str:
    if not values:
        return "·"
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}–{high}"


def format_table(results: list[Compiled]) -> str:
    """Markdown, one row per (d, dtype, tile): each cell spans the input variants (binary/affine, LayerNorm/RMSNorm)
    compiled; registers per target."""
    arches = sorted({r.variant.arch for r in results})
    groups: dict[tuple, list[Compiled]] = {}
    for r in results:
        v = r.variant
        groups.setdefault((v.width, v.dtype, v.block_t, v.num_warps), []).append(r)
    header = ["d", "out", "BLOCK_T × warps", *(f"registers sm_{arch}" for arch in arches), "local B", "LDL/STL",
              "shared B", "store bits", "warps/SM"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (width, dtype, block_t, num_warps), group in groups.items():
        registers = [_span([r.registers for r in group if r.variant.arch == arch]) for arch in arches]
        cells = [str(width), dtype, f"{block_t} × {num_warps}", *registers, _span([r.local_bytes for r in group]),
                 _span([r.local_accesses for r in group]), _span([r.shared_bytes for r in group]),
                 "/".join(map(str, sorted({bits for r in group for bits in r.store_bits}))),
                 _span([r.warps_per_sm for r in group])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHES), choices=ARCHES)
    parser.add_argument("--width", type=int, nargs="+", default=list(SHAPES))
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--sweep", action="store_true", help="compile every tile/warp candidate instead")
    parser.add_argument("--neighbours", type=int, choices=ARCHES, metavar="ARCH",
                        help="also compile, for this target, the neighbours of each affine LayerNorm launch config")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--workers", type=int, help="parallel compiles (default: one per core)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the interpreter cannot compile; unset it for this command")
    variants = (sweep_variants if args.sweep else launch_variants)(args.arch, args.width, args.dtype)
    if args.neighbours:
        variants += [n for v in variants if v.arch == args.neighbours and v.affine and v.layer_norm
                     for n in neighbour_variants(v)]
    start = time.perf_counter()
    results = compile_all(variants, args.workers)
    print(format_table(results))
    print(f"{len(results)} kernels compiled in {time.perf_counter() - start:.1f} s (triton {triton.__version__})")
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "occupancy": r.occupancy} for r in results], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
