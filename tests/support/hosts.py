"""Separate hosts on one machine, for the multi-host tests: each host a network namespace with its own interface
(`eth0`) and address, all joined to a switch (a bridge in a namespace of its own). The addresses come from
198.18.0.0/15, the range set aside for benchmarking networks (RFC 2544), and exist only inside those namespaces:
nothing is routed to or from the machine's own interfaces, and a host has no loopback path to another. Needs
root (`ip netns`). Everything made is removed on exit, failure or not, and namespaces left by a test process
that was killed are removed by the next one."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PREFIX = "fmbc-test-"
SUBNET = "198.18.0"
INTERFACE = "eth0"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def namespaces() -> list[str]:
    listing = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [entry["name"] for entry in json.loads(listing or "[]")]


def kill_processes(namespace: str) -> None:
    """SIGKILL every process in the namespace, as if its host lost power."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def remove_namespace(name: str) -> None:
    """Kill every process in the namespace (a host's processes die with it), then remove it (its veth goes too)."""
    kill_processes(name)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def owner_alive(name: str) -> bool:
    """Whether the test process that made namespace NAME (its pid is in the name) still runs."""
    pid = name.removeprefix(PREFIX).split("-")[0]
    return pid.isdigit() and Path(f"/proc/{pid}").exists()


@dataclass
class Host:
    """One host: its namespace and address. Processes started here see only its interfaces."""

    namespace: str
    address: str

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    def start(self, argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
        """ARGV in its own session on this host, output to LOG."""
        with open(log, "w") as out:
            return subprocess.Popen(self.command(argv), stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, **env}, start_new_session=True)

    def crash(self) -> None:
        """Every process of this host killed at once (its kernel still answers: connections are reset)."""
        kill_processes(self.namespace)

    def set_link(self, state: str) -> None:
        """Its interface "down" (nothing reaches it or leaves it, as with a cut cable or a host without power:
        connections stall rather than reset) or "up"."""
        ip("-n", self.namespace, "link", "set", INTERFACE, state)

    def curl(self, url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, str]:
        """(HTTP status, body) of a GET, or a POST of BODY as JSON, sent with curl from this host (0: no answer)."""
        argv = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--max-time", str(timeout), url]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        out = subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout + 30).stdout
        text, _, status = out.rpartition("\n")
        return int(status or 0), text


def stop(procs: list[subprocess.Popen], grace: float = 60) -> None:
    """SIGTERM each process's session at once, SIGKILL what still runs GRACE seconds later."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def network_hosts(names: list[str]) -> Iterator[dict[str, Host]]:
    """Hosts named NAMES (at most 250), addresses 198.18.0.1, .2, ... in that order, all on one switch."""
    for leftover in namespaces():
        if leftover.startswith(PREFIX) and not owner_alive(leftover):
            remove_namespace(leftover)
    tag = f"{PREFIX}{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
    switch, made = f"{tag}-switch", []
    try:
        ip("netns", "add", switch)
        made.append(switch)
        ip("-n", switch, "link", "add", "br0", "type", "bridge")
        ip("-n", switch, "link", "set", "br0", "up")
        hosts = {}
        for i, name in enumerate(names):
            host = Host(f"{tag}-{name}", f"{SUBNET}.{i + 1}")
            ip("netns", "add", host.namespace)
            made.append(host.namespace)
            ip("link", "add", INTERFACE, "netns", host.namespace, "type", "veth", "peer", "name", f"port{i}",
               "netns", switch)
            ip("-n", switch, "link", "set", f"port{i}", "master", "br0", "up")
            ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", INTERFACE)
            ip("-n", host.namespace, "link", "set", INTERFACE, "up")
            ip("-n", host.namespace, "link", "set", "lo", "up")
            hosts[name] = host
        yield hosts
    finally:
        for namespace in reversed(made):
            remove_namespace(namespace)
