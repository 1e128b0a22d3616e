"""Start a real engine server as a subprocess on a free port, wait until it is healthy, stop it after; the flags
and key of the servers the suites share (tests/engines/conftest.py); read a vLLM server's request counters."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import requests

# One API key per test session, for the servers started with one.
API_KEY = "test-" + uuid.uuid4().hex
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# 64-token prefill chunks: a prompt of a few hundred tokens is prefilled in several steps.
CHUNK = 64
# A small model (or a random one) may keep emitting whitespace between JSON tokens; both engines can forbid it.
NO_FREE_WHITESPACE = {
    "vllm": ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'],
    "sglang": ["--constrained-json-disable-any-whitespace"],
}
DEFAULT_MODEL_FLAGS = {
    "vllm": ["--dtype", "float32", "--enable-prefix-caching", "--max-num-batched-tokens", str(CHUNK),
             "--max-num-seqs", "8"],
    "sglang": ["--chunked-prefill-size", str(CHUNK), "--enable-cache-report"],
}


class Server:
    """A running server: its URL, served model name, log, and the headers a client needs."""

    def __init__(self, url: str, model: str, log: Path, api_key: str | None) -> None:
        self.url, self.model, self.log, self.api_key = url, model, log, api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def post(self, path: str, body: dict, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=body, headers=kwargs.pop("headers", self.headers), timeout=600,
                             **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None,
                   health_path: str = "/health", timeout: float = 600,
                   on_start: Callable[[int], None] | None = None) -> Iterator[str]:
    """Run `command` (which must listen on `port`), yield its base URL once `health_path` answers 200, and
    stop the whole process group afterwards. The server's output goes to `log_path`, quoted on failure.
    `on_start` gets the server's pid (also its session id) as soon as it runs, before it is healthy."""
    base_url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                start_new_session=True)
    try:
        if on_start is not None:
            on_start(proc.pid)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-5000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(base_url + health_path, timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not healthy after {timeout} s:\n{log_path.read_text()[-5000:]}")
            time.sleep(1)
        yield base_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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
