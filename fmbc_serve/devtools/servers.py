"""Start a real server as a subprocess on a free port, wait until it is healthy, and stop its whole process group
after: how the engine tests and the serving benchmark run the engines' OpenAI servers. The standard library
only (no `requests`), so that it imports wherever the package does."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
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
            with contextlib.suppress(OSError), urllib.request.urlopen(base_url + health_path, timeout=5) as reply:
                if reply.status == 200:
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
