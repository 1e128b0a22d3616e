"""Beyond one process, on vLLM's CPU build: tensor, pipeline and data parallelism with parity against the
reference, and two replicas behind SGLang's router (sglang-router) under load while one replica is killed and
restarted. Every rank or replica is pinned to its own core (VLLM_CPU_OMP_THREADS_BIND). Run with `pytest -s`
to see the figures."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from support.checkpoints import INPUT_MODES
from support.engines import require
from support.servers import free_port, running_server

from fmbc_serve.tolerances import FP32_PARITY

pytestmark = pytest.mark.vllm

PROMPTS = [[72, 101, 108, 108, 111], list(range(1, 60)), [300, 0, 301, 5, 5, 9]]
TWO_CORES = {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CPU_KVCACHE_SPACE": "1"}

PARALLEL_PARITY_SCRIPT = """
import json, sys
from fmbc_serve.engines.vllm.runner import greedy
from fmbc_serve.parity import compare, reference_greedy

if __name__ == "__main__":
    engine_args, prompts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for path in sys.argv[3:]:
        engine = greedy(path, prompts, 12, distributed_executor_backend="mp", **engine_args)
        rows = [compare(r, e, len(p)) for r, e, p in zip(reference_greedy(path, prompts, 12), engine, prompts)]
        print("ROWS " + json.dumps([[row.agree, row.max_delta] for row in rows]), flush=True)
"""


def parallel_parity(checkpoints: list[str], engine_args: dict, tmp_path: Path) -> list[list[list]]:
    """Greedy parity of each checkpoint against the reference with the given parallel layout (two workers,
    one core each): per checkpoint, per prompt [tokens equal, max |Δlogprob|]."""
    script = tmp_path / "parallel_parity.py"
    script.write_text(PARALLEL_PARITY_SCRIPT)
    env = {**os.environ, **TWO_CORES, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    result = subprocess.run([sys.executable, str(script), json.dumps(engine_args), json.dumps(PROMPTS),
                             *checkpoints], capture_output=True, text=True, timeout=1200, env=env)
    rows = [json.loads(line[5:]) for line in result.stdout.splitlines() if line.startswith("ROWS ")]
    assert result.returncode == 0 and len(rows) == len(checkpoints), result.stderr[-4000:]
    return rows


def test_tensor_parallel_2_parity(tiny_checkpoints: dict[str, str], house_style_checkpoints: dict[str, str],
                                  tmp_path: Path) -> None:
    """TP = 2: the fixed code is computed on every rank; the learned table is vocab-sharded; a GPT-J-style block
    (shared norm, head bias: each rank holds its share of the head and its bias) too."""
    require("vllm")
    rows = parallel_parity([tiny_checkpoints["binary"], tiny_checkpoints["learned"],
                            house_style_checkpoints["parallel_shared_norm"]], {"tensor_parallel_size": 2}, tmp_path)
    print(f"\nvLLM TP=2 parity (binary, learned, parallel_shared_norm): {rows}")
    assert all(agree and delta <= FP32_PARITY for per_prompt in rows for agree, delta in per_prompt)


def test_pipeline_parallel_2_parity_every_input_mode(tiny_checkpoints: dict[str, str], tmp_path: Path) -> None:
    """PP = 2: layer 0 and the input stage on rank 0, (hidden_states, residual) sent to rank 1. Not eager: with
    enforce_eager the CPU build's last stage never allocates its intermediate-tensor buffer (an assertion in
    vLLM's model runner), as the server's default (compiled) mode does."""
    require("vllm")
    rows = parallel_parity([tiny_checkpoints[mode] for mode in INPUT_MODES],
                           {"pipeline_parallel_size": 2, "enforce_eager": False}, tmp_path)
    print(f"\nvLLM PP=2 parity {INPUT_MODES}: {rows}")
    assert all(agree and delta <= FP32_PARITY for per_prompt in rows for agree, delta in per_prompt)


def successes_by_engine(base_url: str) -> dict[str, float]:
    """vllm:request_success_total summed per engine (data-parallel rank) from the Prometheus endpoint."""
    counts: dict[str, float] = {}
    for line in requests.get(base_url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:request_success_total{"):
            labels, value = line.rsplit(" ", 1)
            engine = labels.split('engine="', 1)[1].split('"', 1)[0]
            counts[engine] = counts.get(engine, 0.0) + float(value)
    return counts


def settled_successes(base_url: str) -> float:
    """Engine 0's success count once it stops moving: vLLM answers a request before it counts it."""
    count = successes_by_engine(base_url).get("0", 0.0)
    for _ in range(20):
        time.sleep(0.5)
        count, previous = successes_by_engine(base_url).get("0", 0.0), count
        if count == previous:
            break
    return count


def test_data_parallel_2_spreads_requests_and_matches_the_reference(tiny_checkpoints: dict[str, str],
                                                                   tmp_path: Path) -> None:
    """`--data-parallel-size 2`: two engine cores behind one API server; both serve, with the reference's
    greedy tokens (which the single-server tests also match)."""
    require("vllm")
    from transformers import AutoTokenizer

    from fmbc_serve.parity import reference_greedy

    checkpoint = tiny_checkpoints["binary"]
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--host",
               "127.0.0.1", "--port", str(port), "--dtype", "float32", "--data-parallel-size", "2"]
    prompts = PROMPTS * 4
    with running_server(command, port, tmp_path / "dp.log", env=TWO_CORES) as base_url:
        def complete(prompt: list[int]) -> str:
            reply = requests.post(base_url + "/v1/completions", timeout=300, json={
                "model": checkpoint, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["text"]

        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(complete, prompts))
        counts = successes_by_engine(base_url)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    expected = [tokenizer.decode(c.tokens) for c in reference_greedy(checkpoint, PROMPTS, 12)]
    print(f"\nvLLM DP=2: requests per engine {counts}")
    assert texts == expected * 4
    assert sorted(counts) == ["0", "1"] and all(n > 0 for n in counts.values()) and sum(counts.values()) == 12


# ---------------------------------------------------------------- replicas behind a router

LOAD_CLIENTS = 16
LOAD_SECONDS = 30
MAX_TOKENS = 24


class LoadResult:
    """What the clients saw: one record per request."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.lock = threading.Lock()

    def add(self, **record) -> None:
        with self.lock:
            self.records.append(record)

    def summary(self, since: float = 0.0, until: float = float("inf")) -> dict:
        chosen = [r for r in self.records if since <= r["start"] < until]
        ok = [r for r in chosen if r["ok"]]
        latencies = sorted(r["end"] - r["start"] for r in ok)
        span = max((r["end"] for r in chosen), default=0) - min((r["start"] for r in chosen), default=0)
        return {"sent": len(chosen), "ok": len(ok), "failed": len(chosen) - len(ok),
                "cut_by_client": sum(r["cut"] for r in ok),
                "requests_per_s": round(len(ok) / span, 2) if span else 0.0,
                "tokens_per_s": round(sum(r["tokens"] for r in ok) / span, 1) if span else 0.0,
                "p50_s": round(statistics.median(latencies), 3) if latencies else None,
                "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)
                if latencies else None}


def client_loop(base_url: str, index: int, deadline: float, result: LoadResult) -> None:
    """One client until the deadline: alternately plain and streaming completions; every third stream is cut
    by the client after its first chunks. Each request is recorded as ok or failed, with its error."""
    session = requests.Session()
    count = 0
    while time.monotonic() < deadline:
        count += 1
        stream = count % 2 == 0
        cut = stream and count % 3 == 0
        body = {"model": "fmbc", "prompt": f"client {index} request {count}: In the beginning",
                "max_tokens": MAX_TOKENS, "temperature": 0.8, "ignore_eos": True, "stream": stream}
        start, tokens, error = time.monotonic(), 0, None
        try:
            with session.post(base_url + "/v1/completions", json=body, stream=stream, timeout=120) as reply:
                if reply.status_code != 200:
                    error = f"HTTP {reply.status_code}: {reply.text[:200]}"
                elif not stream:
                    tokens = reply.json()["usage"]["completion_tokens"]
                else:
                    finished = False
                    for line in reply.iter_lines():
                        if line.startswith(b"data: ") and line != b"data: [DONE]":
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                error = f"stream error: {chunk['error']}"
                                break
                            tokens += 1
                            if cut and tokens >= 3:
                                break  # the client goes away mid-stream
                        elif line == b"data: [DONE]":
                            finished = True
                    if error is None and not cut and not finished:
                        error = f"stream ended without [DONE] after {tokens} chunks"
        except requests.RequestException as exc:
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        result.add(start=start, end=time.monotonic(), ok=error is None, error=error, cut=cut, tokens=tokens)


def drive_load(base_url: str, seconds: float, during=None) -> LoadResult:
    """LOAD_CLIENTS clients for `seconds`; `during(result)` runs alongside (e.g. kills a replica)."""
    result = LoadResult()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(base_url, i, deadline, result))
               for i in range(LOAD_CLIENTS)]
    for thread in threads:
        thread.start()
    if during is not None:
        during(result)
    for thread in threads:
        thread.join(timeout=seconds + 180)
    assert not any(thread.is_alive() for thread in threads), "a client hung: a request was lost"
    return result


def replica_command(checkpoint: str, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--served-model-name",
            "fmbc", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]


def start_replica(checkpoint: str, port: int, core: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(core), "VLLM_CPU_KVCACHE_SPACE": "1"}
    with open(log, "a") as out:
        return subprocess.Popen(replica_command(checkpoint, port), stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def wait_healthy(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout} s")


def router_command(port: int, workers: list[str]) -> list[str]:
    """SGLang's router: round robin, a health check every second (two failures take a replica out, one success
    brings it back), retries of requests whose worker fails before answering, and a 5 s circuit-breaker
    cooldown (the default 60 s keeps a restarted replica without traffic for a minute after the kill)."""
    return [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *workers, "--policy", "round_robin", "--health-check-endpoint", "/health",
            "--health-check-interval-secs", "1", "--health-failure-threshold", "2",
            "--health-success-threshold", "1", "--cb-timeout-duration-secs", "5", "--prometheus-port", str(free_port()),
            "--log-level", "warn"]


def healthy_workers(router_url: str) -> list[str]:
    return sorted(w["url"] for w in requests.get(router_url + "/workers", timeout=10).json()["workers"]
                  if w["is_healthy"])


def test_two_replicas_behind_the_router_survive_a_replica_kill(tiny_checkpoints: dict[str, str],
                                                                tmp_path: Path) -> None:
    require("vllm")
    require("sglang_router")
    checkpoint = tiny_checkpoints["binary"]
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    replicas = [start_replica(checkpoint, port, core, tmp_path / f"replica{core}.log")
                for core, port in enumerate(ports)]
    try:
        for url in urls:
            wait_healthy(url)
        one_port, two_port = free_port(), free_port()
        with running_server(router_command(one_port, urls[:1]), one_port, tmp_path / "router1.log") as one:
            single = drive_load(one, LOAD_SECONDS).summary()
        with running_server(router_command(two_port, urls), two_port, tmp_path / "router2.log") as router:
            assert healthy_workers(router) == sorted(urls)
            double = drive_load(router, LOAD_SECONDS).summary()
            before = settled_successes(urls[0]), settled_successes(urls[1])

            kill = {}

            def kill_second_replica(result: LoadResult) -> None:
                time.sleep(LOAD_SECONDS / 3)
                kill["at"] = time.monotonic()
                os.killpg(replicas[1].pid, signal.SIGKILL)
                replicas[1].wait()
                deadline = time.monotonic() + 30
                while urls[1] in healthy_workers(router) and time.monotonic() < deadline:
                    time.sleep(0.2)
                kill["out_at"] = time.monotonic()

            killed = drive_load(router, LOAD_SECONDS, during=kill_second_replica)
            assert urls[1] not in healthy_workers(router), "the router still lists the killed replica as healthy"
            failures = [r for r in killed.records if not r["ok"]]
            survivor_gain = settled_successes(urls[0]) - before[0]

            # the killed replica comes back on the same port; the router takes it in again
            replicas[1] = start_replica(checkpoint, ports[1], 1, tmp_path / "replica1.log")
            wait_healthy(urls[1])
            deadline = time.monotonic() + 60
            while urls[1] not in healthy_workers(router) and time.monotonic() < deadline:
                time.sleep(0.5)
            rejoined = urls[1] in healthy_workers(router)
            restarted = drive_load(router, 10).summary()
            back = successes_by_engine(urls[1]).get("0", 0.0)
    finally:
        for replica in replicas:
            if replica.poll() is None:
                os.killpg(replica.pid, signal.SIGTERM)
                replica.wait(timeout=60)

    window_start, window_end = kill["at"] - 10, kill["out_at"] + 2
    report = {"one replica": single, "two replicas": double, "kill": killed.summary(),
              "after the kill": killed.summary(since=window_end), "after restart": restarted,
              "failed while the replica went down": len(failures),
              "errors": sorted({r["error"].split(":")[0] for r in failures}),
              "seconds to leave the router": round(kill["out_at"] - kill["at"], 2)}
    print("\nrouter load report: " + json.dumps(report, indent=1))
    assert single["failed"] == 0 and double["failed"] == 0 and restarted["failed"] == 0
    assert single["ok"] > 0 and double["ok"] > 0 and restarted["ok"] > 0
    # only requests in flight around the kill may fail, each with an error, never more than the clients
    assert all(window_start <= r["start"] <= window_end for r in failures), failures
    assert len(failures) <= LOAD_CLIENTS and all(r["error"] for r in failures)
    # after the router took the replica out, every request succeeded, on the survivor. A stream the client cut
    # may be aborted before it finishes, and vLLM counts only finished requests: compare the uncut ones.
    assert report["after the kill"]["failed"] == 0 and report["after the kill"]["ok"] > 0
    finished_after = sum(1 for r in killed.records if r["ok"] and not r["cut"] and r["start"] >= window_end)
    assert survivor_gain >= finished_after
    # after the restart the router takes the replica in again and sends it requests
    assert rejoined and back > 0
