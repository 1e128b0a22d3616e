"""A load generator for an OpenAI server (a router in front of replicas): good clients sending plain and streamed
completions, some streams cut by the client, and misconfigured clients sending bad requests of every kind, each
request recorded with what it got. `python load.py URL MODEL SECONDS` runs the good clients alone and prints the
records as JSON, for a client on another host (run there, e.g. in that host's network namespace)."""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time
from collections.abc import Callable

import requests

LOAD_CLIENTS = 16
BAD_CLIENTS = 4  # each cycles through the bad requests, a request every BAD_PAUSE seconds
BAD_PAUSE = 0.05
MAX_TOKENS = 24
# kind, path, body (JSON, or raw bytes), the status the client must get
BadRequest = tuple[str, str, dict | bytes, int]


def post(url: str, path: str, body: dict | bytes, **kwargs) -> requests.Response:
    """POST a JSON body, or raw bytes sent as JSON (a body the server cannot parse)."""
    if isinstance(body, bytes):
        return requests.post(url + path, data=body, headers={"Content-Type": "application/json"}, timeout=120,
                             **kwargs)
    return requests.post(url + path, json=body, timeout=120, **kwargs)


class LoadResult:
    """What the clients saw: one record per request, good or bad."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.lock = threading.Lock()

    def add(self, **record) -> None:
        with self.lock:
            self.records.append(record)

    def summary(self, since: float = 0.0, until: float = float("inf"), bad: bool = False) -> dict:
        """The requests started in [since, until): the good ones' counts, rates and latencies, or (`bad`) how the
        bad ones were answered."""
        chosen = [r for r in self.records if since <= r["start"] < until and r["bad"] == bad]
        ok = [r for r in chosen if r["ok"]]
        if bad:  # ok: the client got the status its mistake calls for
            return {"sent": len(chosen), "answered as expected": len(ok), "otherwise": len(chosen) - len(ok),
                    "statuses": sorted({r["status"] for r in chosen}, key=str)}
        latencies = sorted(r["end"] - r["start"] for r in ok)
        span = max((r["end"] for r in chosen), default=0) - min((r["start"] for r in chosen), default=0)
        return {"sent": len(chosen), "ok": len(ok), "failed": len(chosen) - len(ok),
                "cut_by_client": sum(r["cut"] for r in ok),
                "requests_per_s": round(len(ok) / span, 2) if span else 0.0,
                "tokens_per_s": round(sum(r["tokens"] for r in ok) / span, 1) if span else 0.0,
                "p50_s": round(statistics.median(latencies), 3) if latencies else None,
                "p99_s": round(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)
                if latencies else None}


def client_loop(base_url: str, model: str, index: int, deadline: float, result: LoadResult) -> None:
    """One client until the deadline: alternately plain and streaming completions; every third stream is cut
    by the client after its first chunks. Each request is recorded as ok or failed, with its error, and whether
    its answer had begun (headers received) when it ended."""
    session = requests.Session()
    count = 0
    while time.monotonic() < deadline:
        count += 1
        stream = count % 2 == 0
        cut = stream and count % 3 == 0
        body = {"model": model, "prompt": f"client {index} request {count}: In the beginning",
                "max_tokens": MAX_TOKENS, "temperature": 0.8, "ignore_eos": True, "stream": stream}
        start, tokens, error, answered = time.monotonic(), 0, None, False
        try:
            with session.post(base_url + "/v1/completions", json=body, stream=stream, timeout=120) as reply:
                answered = True  # the status line and headers arrived: the answer has begun
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
        result.add(start=start, end=time.monotonic(), ok=error is None, error=error, cut=cut, tokens=tokens,
                   answered=answered, bad=False)


def bad_client_loop(base_url: str, bad_requests: list[BadRequest], index: int, deadline: float,
                    result: LoadResult) -> None:
    """A misconfigured client until the deadline: every kind of bad request in turn, one every BAD_PAUSE s."""
    count = index
    while time.monotonic() < deadline:
        kind, path, body, expected = bad_requests[count % len(bad_requests)]
        count += 1
        start = time.monotonic()
        try:
            status = post(base_url, path, body).status_code
        except requests.RequestException as exc:
            status = type(exc).__name__
        result.add(start=start, end=time.monotonic(), ok=status == expected, status=status, kind=kind, bad=True)
        time.sleep(BAD_PAUSE)


def drive_load(base_url: str, model: str, bad_requests: list[BadRequest], seconds: float,
               during: Callable[[LoadResult], None] | None = None) -> LoadResult:
    """LOAD_CLIENTS good clients of `model` and (if there are BAD_REQUESTS) BAD_CLIENTS bad ones for `seconds`;
    `during(result)` runs alongside (e.g. kills a replica)."""
    result = LoadResult()
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, args=(base_url, model, i, deadline, result))
               for i in range(LOAD_CLIENTS)]
    threads += [threading.Thread(target=bad_client_loop, args=(base_url, bad_requests, i, deadline, result))
                for i in range(BAD_CLIENTS if bad_requests else 0)]
    for thread in threads:
        thread.start()
    if during is not None:
        during(result)
    for thread in threads:
        thread.join(timeout=seconds + 180)
    assert not any(thread.is_alive() for thread in threads), "a client hung: a request was lost"
    return result


if __name__ == "__main__":
    url, model, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
    print(json.dumps(drive_load(url, model, [], seconds).records))
