"""Engine servers that several test files share: each starts once, when a test first asks for it, and stops at
the end of the session (an idle server costs no CPU)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from support.engines import require
from support.servers import API_KEY, DEFAULT_MODEL_FLAGS, ENGINE_ENV, NO_FREE_WHITESPACE, Server

from fmbc_serve.devtools.servers import free_port, running_server
from fmbc_serve.serve import SERVED_NAME


@pytest.fixture(scope="session")
def default_model_server(tmp_path_factory) -> Iterator[Callable[[str], Server]]:
    """engine -> `fmbc serve --engine ENGINE --api-key KEY` on the embedded default model, as users start it
    (127.0.0.1, the CPU flags), with prefix caching, 64-token prefill chunks and JSON without free whitespace.
    The operations tests and the examples share it."""
    with ExitStack() as stack:
        servers: dict[str, Server] = {}

        def server(engine: str) -> Server:
            if engine not in servers:
                require(engine)
                port, log = free_port(), tmp_path_factory.mktemp(f"default-{engine}") / "server.log"
                command = [str(Path(sys.executable).parent / "fmbc"), "serve", "--engine", engine, "--port", str(port),
                           "--api-key", API_KEY, *DEFAULT_MODEL_FLAGS[engine], *NO_FREE_WHITESPACE[engine]]
                url = stack.enter_context(running_server(command, port, log, env=ENGINE_ENV, timeout=600))
                servers[engine] = Server(url, SERVED_NAME, log, API_KEY)
            return servers[engine]

        yield server
