"""The engines' own benchmark clients (`vllm bench serve`'s code; SGLang's `python -m sglang.benchmark.serving`),
each imported once in a process of the engine's environment and called there with its command-line arguments once
per measurement: their import takes longer than most measurements.

`BenchClient` is the benchmark's side; `python -m fmbc_serve.devtools.serving_benchmark.client ENGINE` the engine's.
They speak JSON lines: the client process writes "ready" once it has imported the engine's client, then, for each
line of arguments it reads, runs the client once and writes "ok" or the error. The engine client's own output goes
to the client process's stderr (the log), so that nothing it prints can be read as an answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

# The figures read from every client run.
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms", "duration")


def import_vllm_client() -> Callable[[list[str]], None]:
    """`vllm bench serve` as vllm.benchmarks.serve's add_cli_args + main (the CPU distribution's `vllm` console
    script cannot start)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    def run(argv: list[str]) -> None:
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        main(parser.parse_args(argv))

    return run


def import_sglang_client() -> Callable[[list[str]], None]:
    """`python -m sglang.benchmark.serving` as that module's cli_main."""
    from sglang.benchmark.serving import cli_main

    def run(argv: list[str]) -> None:
        sys.argv = ["sglang.benchmark.serving", *argv]
        cli_main()

    return run


ENGINE_CLIENTS = {"vllm": import_vllm_client, "sglang": import_sglang_client}


def serve_measurements(engine: str) -> None:
    """The engine's side: import its client, answer "ready", then run it once per line of arguments on stdin."""
    run = ENGINE_CLIENTS[engine]()
    answers, sys.stdout = sys.stdout, sys.stderr
    answers.write(json.dumps("ready") + "\n")
    answers.flush()
    for line in sys.stdin:
        try:
            run(json.loads(line))
            status = "ok"
        except BaseException as err:  # the client's argparse exits with SystemExit: an answer all the same
            traceback.print_exc()
            status = f"{type(err).__name__}: {err}"
        answers.write(json.dumps(status) + "\n")
        answers.flush()


class BenchClient:
    """One engine's benchmark client, running in the engine's environment between measurements. Its own output
    goes to `log`; `run` hands it one measurement's arguments and waits for its answer."""

    def __init__(self, engine: str, python: str, log: Path, timeout: float) -> None:
        self.log = log
        self._log_file = log.open("w")
        # Offline: every tokenizer it needs is in a checkpoint folder; a hub lookup would only wait for a timeout.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.proc = subprocess.Popen([python, "-m", __name__, engine], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log_file, text=True)
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


def client_args(engine: str, url: str, checkpoint: str, concurrency: int, prompts: int, seed: int, input_len: int,
                output_len: int, result: Path, extra_body: dict | None = None) -> list[str]:
    """The engine's own client's arguments: random token ids, fixed lengths, EOS ignored, results to `result`;
    `extra_body` (vLLM's client) goes into every request as it is."""
    if engine == "vllm":
        extra = ["--extra-body", json.dumps(extra_body)] if extra_body else []
        return [*extra, "--backend", "vllm", "--base-url", url, "--model", "fmbc", "--tokenizer", checkpoint,
                "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len",
                str(output_len), "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
                "--ignore-eos", "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99", "--seed",
                str(seed), "--disable-tqdm", "--save-result", "--result-dir", str(result.parent),
                "--result-filename", result.name]
    # --model is the checkpoint folder (the client reads its tokenizer config; given the served name it would look
    # for it on the hub), --served-model-name what requests carry.
    return ["--backend", "sglang", "--base-url", url, "--model", checkpoint, "--served-model-name", "fmbc",
            "--tokenizer", checkpoint, "--dataset-name", "random-ids",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--random-range-ratio", "1", "--num-prompts", str(prompts), "--max-concurrency", str(concurrency),
            "--seed", str(seed), "--disable-tqdm", "--output-file", str(result)]


def read_result(path: Path) -> dict[str, float]:
    """The figures from a client's result file (vLLM: one JSON object; SGLang: JSON lines, the last one)."""
    record = json.loads(path.read_text().strip().splitlines()[-1])
    return {metric: float(record[metric]) for metric in METRICS}


if __name__ == "__main__":
    serve_measurements(sys.argv[1])
