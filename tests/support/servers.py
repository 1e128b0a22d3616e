"""The servers the suites start (with `fmbc_serve.devtools.servers`): their environment, the flags and key of the
ones they share (tests/engines/conftest.py), a handle for clients, and a vLLM server's request counters."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import requests

# One API key per test session, for the servers started with one.
API_KEY = "test-" + uuid.uuid4().hex
# Every engine server of the suites: a 1 GiB KV cache on vLLM's CPU build, and no hub lookups.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# 64-token prefill chunks: a prompt of a few hundred tokens is prefilled in several steps.
PREFILL_CHUNK = 64
# A small model (or a random one) may keep emitting whitespace between JSON tokens; both engines can forbid it.
NO_FREE_WHITESPACE = {
    "vllm": ["--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}'],
    "sglang": ["--constrained-json-disable-any-whitespace"],
}
DEFAULT_MODEL_FLAGS = {
    "vllm": ["--dtype", "float32", "--enable-prefix-caching", "--max-num-batched-tokens", str(PREFILL_CHUNK),
             "--max-num-seqs", "8"],
    "sglang": ["--chunked-prefill-size", str(PREFILL_CHUNK), "--enable-cache-report"],
}


class Server:
    """A running server: its URL, served model name, log, and the headers a client needs."""

    def __init__(self, url: str, model: str, log: Path, api_key: str | None) -> None:
        self.url, self.model, self.log, self.api_key = url, model, log, api_key
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def post(self, path: str, body: dict, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=body, headers=kwargs.pop("headers", self.headers), timeout=600,
                             **kwargs)


def successes_by_engine(base_url: str) -> dict[str, float]:
    """vllm:request_success_total summed per engine (data-parallel rank) from the Prometheus endpoint."""
    return successes_in(requests.get(base_url + "/metrics", timeout=10).text)


def successes_in(metrics: str) -> dict[str, float]:
    """vllm:request_success_total summed per engine (data-parallel rank) in a Prometheus exposition."""
    counts: dict[str, float] = {}
    for line in metrics.splitlines():
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
