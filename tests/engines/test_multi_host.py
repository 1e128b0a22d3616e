"""FMBC across two hosts with vLLM's own multi-node executor (`--nnodes 2`, the second host `--headless`), started
as users start it (`fmbc serve`, which runs `vllm serve`), each host a network namespace with its own address
(tests/support/hosts.py), the client on a third. Each host reaches the checkpoint at a path of its own. Needs
root, as CI runs. Run with `pytest -s` to see the figures."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.engines import require
from support.hosts import PREFIX, Host, namespaces, network_hosts, stop
from support.servers import ENGINE_ENV, successes_in

from fmbc_serve.parity import Completion, compare, reference_greedy
from fmbc_serve.tolerances import FP32_PARITY

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")]

PROMPTS = [[72, 101, 108, 108, 111], list(range(1, 60)), [300, 0, 301, 5, 5, 9]]
NEW_TOKENS = 12
PORT, MASTER_PORT = 30000, 29555
FMBC = str(Path(sys.executable).parent / "fmbc")


@pytest.fixture(scope="module")
def hosts() -> Iterator[dict[str, Host]]:
    require("vllm")
    with network_hosts(["head", "worker", "client"]) as made:
        yield made


@contextlib.contextmanager
def two_hosts_started(hosts: dict[str, Host], checkpoint: str, flags: list[str], worker_flags: list[str],
                      folder: Path, worker_env: dict[str, str] | None = None) -> Iterator[list[subprocess.Popen]]:
    """`fmbc serve ... FLAGS` on the head host (the OpenAI server) and `... FLAGS --headless WORKER_FLAGS` on the
    worker, one core each, each with its own copy of CHECKPOINT, the worker in WORKER_ENV. Both stopped after."""
    head, worker = hosts["head"], hosts["worker"]
    common = ["--engine", "vllm", "--dtype", "float32", *flags]
    procs = []
    try:
        for rank, host in enumerate((head, worker)):
            copy = shutil.copytree(checkpoint, folder / f"{host.namespace}-model")
            own = ["--host", head.address, "--port", str(PORT)] if rank == 0 else ["--headless", *worker_flags]
            env = {**ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": str(rank), **(worker_env or {} if rank else {})}
            procs.append(host.start([FMBC, "serve", str(copy), *common, *own], folder / f"node{rank}.log", env))
        yield procs
    finally:
        stop(procs)


def multi_node(hosts: dict[str, Host]) -> list[str]:
    """vLLM's multi-node flags for two hosts with the head as master."""
    return ["--nnodes", "2", "--master-addr", hosts["head"].address, "--master-port", str(MASTER_PORT),
            "--distributed-executor-backend", "mp"]


def wait_healthy(client: Host, url: str, procs: list[subprocess.Popen], folder: Path) -> float:
    """Seconds until /health answers 200 to the client host; fails at once if either host's server exits."""
    started = time.monotonic()
    while client.curl(url + "/health", timeout=5)[0] != 200:
        for rank, proc in enumerate(procs):
            assert proc.poll() is None, (folder / f"node{rank}.log").read_text()[-5000:]
        assert time.monotonic() - started < 600, "not healthy after 600 s"
        time.sleep(1)
    return time.monotonic() - started


def served_greedy(client: Host, url: str, prompt: list[int]) -> Completion:
    """Greedy tokens and logprobs (prompt ones too, by echo) from /v1/completions, asked from the client host."""
    status, text = client.curl(url + "/v1/completions", {
        "model": "fmbc", "prompt": prompt, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS, "ignore_eos": True,
        "temperature": 0, "logprobs": 1, "echo": True, "return_tokens_as_token_ids": True})
    assert status == 200, text
    logprobs = json.loads(text)["choices"][0]["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
    n = len(prompt)
    assert tokens[:n] == prompt
    return Completion(tokens[n:], logprobs["token_logprobs"][n:], logprobs["token_logprobs"][1:n])


@pytest.mark.parametrize(("layout", "parallel"), [("pipeline", ["--pipeline-parallel-size", "2"]),
                                                  ("tensor", ["--tensor-parallel-size", "2"])])
def test_two_hosts_serve_with_reference_parity(layout: str, parallel: list[str], hosts: dict[str, Host],
                                               tiny_checkpoints: dict[str, str],
                                               parallel_block_checkpoints: dict[str, str], tmp_path: Path) -> None:
    """One stage (pipeline) or one rank (tensor) per host; the fixed binary code under pipeline parallelism, a
    parallel-residual (GPT-NeoX style) checkpoint under tensor parallelism: greedy tokens equal to the
    reference's, logprobs within FP32_PARITY, answered to a client on a third host."""
    checkpoint = tiny_checkpoints["binary"] if layout == "pipeline" else parallel_block_checkpoints["parallel"]
    url, client = f"http://{hosts['head'].address}:{PORT}", hosts["client"]
    with two_hosts_started(hosts, checkpoint, multi_node(hosts) + parallel, ["--node-rank", "1"], tmp_path) as procs:
        up_s = wait_healthy(client, url, procs, tmp_path)
        served = [served_greedy(client, url, prompt) for prompt in PROMPTS]
        if layout == "tensor":
            worker_killed_mid_stream(hosts, url, procs[0])
    rows = [compare(ref, eng, len(p)) for ref, eng, p in zip(reference_greedy(checkpoint, PROMPTS, NEW_TOKENS),
                                                              served, PROMPTS, strict=True)]
    print(f"\n{layout} parallel across two hosts: healthy after {up_s:.0f} s; per prompt (tokens equal, max "
          f"|Δlogprob|): {[(r.agree, f'{r.max_delta:.1e}') for r in rows]}")
    assert all(row.agree and row.max_delta <= FP32_PARITY for row in rows), rows


def test_data_parallel_across_two_hosts_spreads_requests(hosts: dict[str, Host], tiny_checkpoints: dict[str, str],
                                                         tmp_path: Path) -> None:
    """`--data-parallel-size 2`, one engine per host (the worker `--headless --data-parallel-start-rank 1`), one
    API server on the head: concurrent requests from the client host answered with the reference's greedy
    tokens, and both engines took some."""
    checkpoint = tiny_checkpoints["learned"]
    flags = ["--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-address",
             hosts["head"].address, "--data-parallel-rpc-port", str(MASTER_PORT)]
    url, client = f"http://{hosts['head'].address}:{PORT}", hosts["client"]
    with two_hosts_started(hosts, checkpoint, flags, ["--data-parallel-start-rank", "1"], tmp_path) as procs:
        up_s = wait_healthy(client, url, procs, tmp_path)
        with ThreadPoolExecutor(6) as pool:
            served = list(pool.map(lambda prompt: served_greedy(client, url, prompt), PROMPTS * 4))
        status, metrics = client.curl(url + "/metrics")
    counts = successes_in(metrics)
    reference = reference_greedy(checkpoint, PROMPTS, NEW_TOKENS)
    rows = [compare(ref, eng, len(p)) for ref, eng, p in zip(reference * 4, served, PROMPTS * 4, strict=True)]
    print(f"\ndata parallel across two hosts (learned table): healthy after {up_s:.0f} s; requests per engine "
          f"{counts}; max |Δlogprob| {max(r.max_delta for r in rows):.1e}")
    assert status == 200 and all(row.agree and row.max_delta <= FP32_PARITY for row in rows), rows
    assert sorted(counts) == ["0", "1"] and all(n > 0 for n in counts.values()), counts


def worker_killed_mid_stream(hosts: dict[str, Host], url: str, head: subprocess.Popen) -> None:
    """The worker host dies while the head streams an answer: the stream ends with an error event (no hang),
    /health stops answering 200, and the head's server exits."""
    body = {"model": "fmbc", "prompt": [1], "max_tokens": 250, "ignore_eos": True, "temperature": 0, "stream": True}
    stream = subprocess.Popen(hosts["client"].command(
        ["curl", "-sN", "--max-time", "120", url + "/v1/completions", "-H", "Content-Type: application/json", "-d",
         json.dumps(body)]), stdout=subprocess.PIPE, text=True)
    first = stream.stdout.readline()
    assert first.startswith("data: {"), first
    killed = time.monotonic()
    hosts["worker"].crash()
    rest, _ = stream.communicate(timeout=120)
    stream_end_s = time.monotonic() - killed
    while hosts["client"].curl(url + "/health", timeout=5)[0] == 200:
        assert time.monotonic() - killed < 60, "/health still 200 a minute after the worker host died"
        time.sleep(0.2)
    unhealthy_s = time.monotonic() - killed
    head.wait(timeout=120)
    events = [line for line in rest.splitlines() if line.startswith("data: ")]
    print(f"\nworker host killed mid-stream: {len(events)} more events, the stream ended {stream_end_s:.1f} s "
          f"later with {events[-2:]}, /health not 200 after {unhealthy_s:.1f} s, head exited "
          f"{time.monotonic() - killed:.0f} s after the kill (code {head.returncode})")
    assert any('"error"' in event for event in events) and events[-1] == "data: [DONE]", events[-3:]


def test_a_host_without_the_plugin_fails_clearly_and_the_head_gives_up(hosts: dict[str, Host],
                                                                       tiny_checkpoints: dict[str, str],
                                                                       tmp_path: Path) -> None:
    """The worker's vLLM without fmbc-serve's plugin (switched off by vLLM's own filter, VLLM_PLUGINS=none) stops
    at once naming the architecture it lacks; the head, which cannot see why, gives up after
    --distributed-timeout-seconds saying how many hosts joined (vLLM's default is torch's: 30 min on gloo)."""
    flags = multi_node(hosts) + ["--tensor-parallel-size", "2", "--distributed-timeout-seconds", "30",
                                 "--cpu-distributed-timeout-seconds", "30"]
    started = time.monotonic()
    with two_hosts_started(hosts, tiny_checkpoints["binary"], flags, ["--node-rank", "1"], tmp_path,
                           {"VLLM_PLUGINS": "none"}) as procs:
        head, worker = procs
        assert worker.wait(timeout=300) != 0
        assert head.wait(timeout=300) != 0
    worker_log, head_log = (tmp_path / "node1.log").read_text(), (tmp_path / "node0.log").read_text()
    print(f"\nworker without the plugin: both hosts exited, the head {time.monotonic() - started:.0f} s after the "
          "start")
    assert "Model architectures ['FMBCForCausalLM'] are not supported" in worker_log
    assert "1/2 clients joined" in head_log


def test_hosts_are_removed_after_a_failure() -> None:
    """A failure inside leaves no namespace, interface or process behind."""
    with pytest.raises(RuntimeError, match="inside"), network_hosts(["one", "two"]) as made:
        sleeper = made["one"].start(["sleep", "600"], Path(os.devnull), {})
        tag = made["one"].namespace.removesuffix("-one")
        raise RuntimeError("a failure inside")
    assert sleeper.wait(timeout=30) == -9
    assert tag.startswith(PREFIX) and not [name for name in namespaces() if name.startswith(tag)]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert "port0" not in links and "br0" not in links
