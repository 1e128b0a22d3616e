"""One GPU acceptance run of the fused code + norm kernel, written to one JSON file.

    python scripts/gpu_check.py --out gpu_check.json     # a machine with one NVIDIA GPU: ~3-5 minutes, < 8
    python scripts/gpu_check.py --dry-run --out dry.json  # no GPU: everything but the CUDA parts (CI runs this)

Needs only torch, triton, transformers and pytest (no engines, no network; torch 2.11 and triton 3.6 are enough)
and runs from the source tree without `pip install .`: it links `fmbc_serve` and `kernels/` (as `fmbc_kernels`,
the name the package installs it under) into a temporary folder put first on the path, so the checkout's code is
what runs even where an older fmbc-serve is installed. Sections, each passed / failed / skipped in the JSON:

1. kernel_tests: `pytest tests/unit/test_kernel.py` on the GPU (the dry run selects the bf16 and norm x dtype cases,
   under the Triton interpreter: the whole file runs in CI on its own).
2. compile: the kernel compiled ahead of time for this GPU's target by `fmbc_kernels.compile_report` (what
   tests/unit/test_kernel_compile.py checks) against the kernel the JIT compiles at launch on the GPU: the same Triton
   hash (the same specialisation, options and target), registers, no spills, 128-bit stores.
3. bandwidth: at 4k, 16k and 64k tokens (the paper's d and V, bf16, LayerNorm), the kernel's device time
   (CUDA-graph replays, `triton.testing.do_bench_cudagraph`) and bytes/s as a fraction of a device-to-device copy
   of its output's size; the unfused torch path's time; and, at 16k tokens, the launch tile against its neighbours.
4. model: the reference FMBCForCausalLM at the paper's shape (the `paper` preset; 2 layers in the dry run) in
   bf16, fused (counted kernel calls) and unfused (FMBC_DISABLE_TRITON=1), each against the fp32
   unfused model; then `torch.compile(mode="reduce-overhead")` (Inductor with CUDA graphs) on new ids of the
   same shape, against the same reference. Passes when neither fused nor compiled is further from fp32 than the
   unfused bf16 model, by more than 10% (mean |delta logit|).

Exit status 0 when every section that ran passed, 1 otherwise, 2 for bad usage (no CUDA without --dry-run).
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "fmbc-gpu-check/1"
SECTIONS = ("environment", "kernel_tests", "compile", "bandwidth", "model")
DRY_RUN_TESTS = "bf16_kernel_against or norm_dtype_and_variant_cross"
EPS = 1e-5
TOKEN_COUNTS = (4096, 16384, 65536)
MODEL_ERROR_MARGIN = 1.10  # fused / compiled mean |delta logit| against fp32, over the unfused bf16 model's


def link_source_tree() -> Path:
    """A folder with `fmbc_serve` and `fmbc_kernels` linked to this checkout. Not the repository root itself: its
    `kernels/` would be importable as `kernels`, the name of Hugging Face's package that transformers probes."""
    folder = Path(tempfile.mkdtemp(prefix="fmbc-gpu-check-"))
    (folder / "fmbc_serve").symlink_to(REPO / "fmbc_serve", target_is_directory=True)
    (folder / "fmbc_kernels").symlink_to(REPO / "kernels", target_is_directory=True)
    return folder


def run_section(name: str, body: Callable[[], dict]) -> dict:
    """Run one section; an exception fails it (with the traceback's tail) without stopping the others."""
    print(f"[gpu_check] {name} ...", flush=True)
    start = time.perf_counter()
    try:
        result = body()
    except Exception:  # noqa: BLE001 - one section's failure is recorded, the others still run
        result = {"status": "failed", "error": traceback.format_exc()[-4000:]}
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(f"[gpu_check] {name}: {result['status']} ({result['seconds']} s)", flush=True)
    return result


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def paper_shape() -> tuple[int, int]:
    """The paper's V and d, from the checkout's presets (so called only once main() has linked the source tree)."""
    from fmbc_serve.checkpoint import PRESETS

    return PRESETS["paper"]["vocab_size"], PRESETS["paper"]["hidden_size"]


def environment(device: torch.device) -> dict:
    import fmbc_kernels
    import transformers
    import triton

    info = {"status": "passed", "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "fmbc_kernels": str(Path(fmbc_kernels.__file__).resolve().parent), "device": device.type}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(gpu=properties.name, capability=list(torch.cuda.get_device_capability(device)),
                    multiprocessors=properties.multi_processor_count,
                    memory_gib=round(properties.total_memory / 2**30, 1))
    if Path(info["fmbc_kernels"]) != (REPO / "kernels").resolve():
        info.update(status="failed", error=f"fmbc_kernels came from {info['fmbc_kernels']}, not this checkout")
    return info


def kernel_tests(dry_run: bool, env: dict) -> dict:
    """pytest on tests/unit/test_kernel.py, counted from its JUnit XML."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "tests/unit/test_kernel.py", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={report}", *(("-k", DRY_RUN_TESTS) if dry_run else ())]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        root = ElementTree.parse(report).getroot() if report.exists() else ElementTree.Element("none")
        counts = {key: sum(int(suite.get(key, 0)) for suite in root.iter("testsuite"))
                  for key in ("tests", "failures", "errors", "skipped")}
        failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
    passed = result.returncode == 0 and counts["tests"] > 0 and not failed
    return {"status": "passed" if passed else "failed", "command": " ".join(command[1:]), **counts,
            "failed": failed, "output_tail": "" if passed else (result.stdout + result.stderr)[-4000:]}


def compile_section(device: torch.device, arch: int, env: dict) -> dict:
    """The ahead-of-time compile for `arch` (a subprocess: it must not run under TRITON_INTERPRET), and on a GPU
    the JIT's own compile of the same four launches."""
    from fmbc_kernels import compile_report

    if arch not in compile_report.ARCHES:
        return skipped(f"sm_{arch} is not among the checked targets {compile_report.ARCHES}")
    _, width = paper_shape()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "aot.json"
        command = [sys.executable, "-m", "fmbc_kernels.compile_report", "--arch", str(arch), "--width", str(width),
                   "--dtype", "bfloat16", "--json", str(out)]
        aot_env = {key: value for key, value in env.items() if key != "TRITON_INTERPRET"}
        result = subprocess.run(command, cwd=REPO, env=aot_env, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            return {"status": "failed", "error": (result.stdout + result.stderr)[-4000:]}
        aot = json.loads(out.read_text())
    problems = [f"{r['variant']}: spills or narrow stores" for r in aot
                if r["local_bytes"] or r["store_bits"] != [128]]
    records = [{"variant": r["variant"], "aot": {key: r[key] for key in ("registers", "local_bytes", "store_bits",
                                                                          "warps_per_sm", "kernel_hash")}}
               for r in aot]
    if device.type == "cuda":
        from fmbc_kernels.code_norm_triton import code_norm_kernel

        for record in records:
            grid, args, options = compile_report.variant_arguments(compile_report.Variant(**record["variant"]),
                                                                    device)
            kernel = code_norm_kernel[grid](*args, **options)
            torch.cuda.synchronize(device)
            registers, local_bytes, _, store_bits = compile_report.inspect_kernel(kernel)
            record["jit"] = {"registers": registers, "local_bytes": local_bytes, "store_bits": list(store_bits),
                             "n_regs": kernel.n_regs, "n_spills": kernel.n_spills, "kernel_hash": kernel.hash}
            if kernel.hash != record["aot"]["kernel_hash"] or kernel.n_regs != record["aot"]["registers"]:
                problems.append(f"{record['variant']}: the JIT compiled something else than the AOT check")
            if kernel.n_spills:
                problems.append(f"{record['variant']}: {kernel.n_spills} spills at launch")
    return {"status": "failed" if problems else "passed", "arch": arch, "problems": problems,
            "jit": "compared" if device.type == "cuda" else "skipped: no GPU (dry run)", "kernels": records}


def bandwidth(device: torch.device) -> dict:
    """Device times of the kernel, a copy and the unfused path; the kernel's bytes/s over the copy's."""
    import triton
    from fmbc_kernels import compile_report, fused_code_norm
    from fmbc_kernels.code_norm_triton import code_norm_kernel, kernel_arguments, launch_config
    from triton.testing import do_bench, do_bench_cudagraph

    from fmbc_serve.binary_code import BinaryCode, FixedCodeInput

    vocab_size, width = paper_shape()
    dtype = torch.bfloat16
    code = BinaryCode(vocab_size, width)
    norm = torch.nn.LayerNorm(width, device=device, dtype=dtype)
    code_input = FixedCodeInput(code).to(device)
    rows = []
    for num_tokens in TOKEN_COUNTS:
        ids = torch.randint(0, vocab_size, (num_tokens,), device=device)
        out_bytes = 2 * num_tokens * width * dtype.itemsize  # residual + normed
        moved = out_bytes + ids.numel() * ids.element_size() + width * (8 + 2 * dtype.itemsize)  # + tables, w, b
        source = torch.empty(out_bytes, dtype=torch.uint8, device=device)
        target = torch.empty_like(source)

        def fused(ids: torch.Tensor = ids) -> object:
            return fused_code_norm(ids, code, norm.weight, norm.bias, EPS, dtype, check_ids=False)

        def unfused(ids: torch.Tensor = ids) -> object:
            residual = code_input(ids, dtype)
            return norm(residual), residual

        with torch.inference_mode():
            fused_ms = do_bench_cudagraph(fused, rep=50, return_mode="median")
            unfused_ms = do_bench_cudagraph(unfused, rep=50, return_mode="median")
            copy_ms = do_bench_cudagraph(functools.partial(target.copy_, source), rep=50, return_mode="median")
            fused_wall_ms = do_bench(fused, return_mode="median")
            unfused_wall_ms = do_bench(unfused, return_mode="median")
        kernel_gbs, copy_gbs = moved / fused_ms / 1e6, 2 * out_bytes / copy_ms / 1e6
        rows.append({"tokens": num_tokens, "fused_us": round(fused_ms * 1e3, 2), "copy_us": round(copy_ms * 1e3, 2),
                     "unfused_us": round(unfused_ms * 1e3, 2), "kernel_gbs": round(kernel_gbs, 1),
                     "copy_gbs": round(copy_gbs, 1), "fraction_of_copy": round(kernel_gbs / copy_gbs, 3),
                     "speedup_vs_unfused": round(unfused_ms / fused_ms, 2),
                     "fused_wall_us": round(fused_wall_ms * 1e3, 2),
                     "unfused_wall_us": round(unfused_wall_ms * 1e3, 2)})

    # The launch tile against its neighbours, measured (the compile evidence chose it without a GPU).
    num_tokens, tiles = 16384, []
    config = launch_config(width, dtype)
    ids = torch.randint(0, vocab_size, (num_tokens,), device=device)
    tables = code.tables().to(device)
    residual, normed = (torch.empty(num_tokens, width, dtype=dtype, device=device) for _ in range(2))
    candidates = [(config.block_t, config.num_warps), *compile_report.neighbour_tiles(config.block_t,
                                                                                        config.num_warps)]
    for block_t, num_warps in candidates:
        tile = config._replace(block_t=block_t, num_warps=num_warps)
        grid, args, options = kernel_arguments(ids, *tables, 0, code.low_value, code.high_value, norm.weight,
                                               norm.bias, EPS, residual, normed, True, tile)
        launch = functools.partial(code_norm_kernel[grid], *args, **options)
        microseconds = do_bench_cudagraph(launch, rep=50, return_mode="median") * 1e3
        tiles.append({"block_t": block_t, "num_warps": num_warps, "us": round(microseconds, 2),
                      "launched": tile == config})
    best = min(tile["us"] for tile in tiles)
    return {"status": "passed", "width": width, "dtype": "bfloat16", "vocab_size": vocab_size, "norm": "layernorm",
            "triton_do_bench": triton.__version__, "rows": rows, "tile_candidates_16k": tiles,
            "launched_tile_vs_best": round(next(t["us"] for t in tiles if t["launched"]) / best, 3)}


@contextmanager
def unfused_path():
    """FMBC_DISABLE_TRITON=1 for the duration: the input stage takes the torch path."""
    previous = os.environ.get("FMBC_DISABLE_TRITON")
    os.environ["FMBC_DISABLE_TRITON"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["FMBC_DISABLE_TRITON"]
        else:
            os.environ["FMBC_DISABLE_TRITON"] = previous


def count_kernel_calls(dry_run: bool) -> dict:
    """Wrap the kernel entry point the input stage calls, counting calls. In the dry run, also let the stage take
    the kernel on CPU: there it runs under the Triton interpreter (the stage enables it on CUDA only)."""
    import fmbc_kernels

    from fmbc_serve import modeling_fmbc

    counter = {"calls": 0}

    def counted(*args, **kwargs):
        counter["calls"] += 1
        return fmbc_kernels.fused_code_norm(*args, **kwargs)

    modeling_fmbc.fused_code_norm = counted
    if dry_run:
        modeling_fmbc.fused_kernel_enabled = lambda device: os.environ.get("FMBC_DISABLE_TRITON") != "1"
    return counter


def mean_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return (logits.float() - reference).abs().mean().item()


def model_section(device: torch.device, dry_run: bool) -> dict:
    from fmbc_serve.checkpoint import make_config
    from fmbc_serve.modeling_fmbc import FMBCForCausalLM

    layers, batch, length = (2, 1, 16) if dry_run else (32, 4, 512)
    config = make_config("paper", num_hidden_layers=layers)
    counter = count_kernel_calls(dry_run)
    torch.manual_seed(0)
    with device:
        reference_model = FMBCForCausalLM(config).eval()
    model = copy.deepcopy(reference_model).to(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    id_sets = [torch.randint(0, config.vocab_size, (batch, length), generator=generator).to(device) for _ in range(3)]

    def logits(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(input_ids=ids, use_cache=False).logits

    with unfused_path():
        references = [logits(reference_model, ids).float() for ids in id_sets]
        unfused = logits(model, id_sets[0])
    fused = logits(model, id_sets[0])
    eager_calls = counter["calls"]
    errors = {"unfused_bf16": mean_error(unfused, references[0]), "fused_bf16": mean_error(fused, references[0])}
    result = {"config": {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
                         "num_hidden_layers": layers, "num_attention_heads": config.num_attention_heads,
                         "intermediate_size": config.intermediate_size, "dtype": "bfloat16",
                         "batch": batch, "length": length},
              "kernel_calls_eager": eager_calls,
              "max_abs_fused_vs_unfused": (fused.float() - unfused.float()).abs().max().item()}

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    mode = "reduce-overhead" if device.type == "cuda" else None  # Inductor's CUDA graphs; none on CPU
    compiled = torch.compile(model, mode=mode)
    calls_before = counter["calls"]
    compiled_errors = [mean_error(logits(compiled, ids), reference) for ids, reference in zip(id_sets, references,
                                                                                               strict=True)]
    errors["compiled_bf16"] = max(compiled_errors)
    counters = torch._dynamo.utils.counters
    result.update(kernel_calls_compiled=counter["calls"] - calls_before, torch_compile_mode=mode or "default",
                  cudagraph_skips=sum(counters["inductor"].get(key, 0) for key in counters["inductor"]
                                      if "cudagraph_skips" in key),
                  graph_breaks=sum(counters["graph_break"].values()),
                  mean_abs_error_vs_fp32={key: round(value, 6) for key, value in errors.items()})
    problems = []
    if eager_calls < 1:
        problems.append("the eager fused model never called the kernel")
    if result["kernel_calls_compiled"] < 1:
        problems.append("torch.compile traced the model without the kernel")
    for key in ("fused_bf16", "compiled_bf16"):
        if errors[key] > MODEL_ERROR_MARGIN * errors["unfused_bf16"]:
            problems.append(f"{key} is further from fp32 than the unfused bf16 model: {errors}")
    if device.type == "cuda":
        if result["cudagraph_skips"]:
            problems.append(f"Inductor skipped CUDA graphs {result['cudagraph_skips']} time(s)")
        from triton.testing import do_bench

        with torch.inference_mode():
            forward = {"fused_eager": do_bench(lambda: model(input_ids=id_sets[0], use_cache=False)),
                       "compiled_reduce_overhead": do_bench(lambda: compiled(input_ids=id_sets[0], use_cache=False))}
            with unfused_path():
                forward["unfused_eager"] = do_bench(lambda: model(input_ids=id_sets[0], use_cache=False))
        result["forward_ms"] = {key: round(value, 3) for key, value in forward.items()}
    else:
        result["forward_ms"] = "skipped: no GPU (dry run)"
    return {"status": "failed" if problems else "passed", "problems": problems, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"),
                        help="where to write the JSON result (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: run everything but the CUDA parts, the kernel under the Triton interpreter")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: this check needs one NVIDIA GPU (use --dry-run to check the script on CPU)")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    source = link_source_tree()
    sys.path.insert(0, str(source))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(source), os.environ.get("PYTHONPATH")))),
           "PYTHONSAFEPATH": "1"}
    device = torch.device("cpu" if args.dry_run else "cuda")
    arch = 90 if args.dry_run else 10 * torch.cuda.get_device_capability()[0] + torch.cuda.get_device_capability()[1]
    start = time.perf_counter()
    result = {"schema": SCHEMA, "mode": "dry-run" if args.dry_run else "gpu"}
    result["environment"] = run_section("environment", lambda: environment(device))
    result["kernel_tests"] = run_section("kernel_tests", lambda: kernel_tests(args.dry_run, env))
    result["compile"] = run_section("compile", lambda: compile_section(device, arch, env))
    result["bandwidth"] = run_section("bandwidth", lambda: skipped("no GPU (dry run)") if args.dry_run
                                      else bandwidth(device))
    result["model"] = run_section("model", lambda: model_section(device, args.dry_run))
    result["passed"] = all(result[name]["status"] != "failed" for name in SECTIONS)
    result["seconds"] = round(time.perf_counter() - start, 1)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"[gpu_check] {'PASSED' if result['passed'] else 'FAILED'} in {result['seconds']} s; wrote {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
