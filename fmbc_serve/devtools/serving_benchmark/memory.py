"""The servers' memory, sampled without disturbing them."""

from __future__ import annotations

import threading
from pathlib import Path


class MemoryWatch:
    """Memory of each server's process tree (its session: the server and every process it starts). The peak RSS
    (sum over the processes) is sampled every `interval` seconds from /proc/PID/status, which only reads counters.
    PSS, which splits shared pages between the processes that map them and so does not count a library or a
    shared tensor twice, comes from smaps_rollup, read only when asked, with the servers idle: reading it walks the
    process's page tables under its memory-map lock, and sampling it during the rounds stalled the servers' streams
    (docs/benchmarks.md has the figures)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.sessions: dict[int, str] = {}
        self.peaks: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def watch(self, name: str, session: int) -> None:
        """Count the processes of `session` (a server's pid: it starts its own session) as `name`'s."""
        with self._lock:
            self.sessions[session] = name
            self.peaks[name] = 0.0

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self._sum("status", "VmRSS:")
            with self._lock:
                for name, kib in rss.items():
                    self.peaks[name] = max(self.peaks[name], kib / 2**20)

    def pss_gib(self, name: str) -> float:
        """The process tree's PSS now (call it between measurements)."""
        return self._sum("smaps_rollup", "Pss:").get(name, 0) / 2**20

    def threads(self, name: str) -> int:
        """Threads of `name`'s processes still alive: 0 once a stopped server's whole tree has exited."""
        return self._sum("status", "Threads:").get(name, 0)

    def _sum(self, file: str, field: str) -> dict[str, int]:
        """The number after `field` in /proc/PID/`file` (KiB for memory), summed over each watched session's
        processes."""
        with self._lock:
            sessions = dict(self.sessions)
        totals = dict.fromkeys(sessions.values(), 0)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                session = int(stat.read_text().rsplit(")", 1)[1].split()[3])
                if session in sessions:
                    totals[sessions[session]] += _proc_kib(stat.with_name(file), field)
            except (OSError, ValueError, IndexError):
                continue  # the process ended between the listing and the read
        return totals


def _proc_kib(path: Path, field: str) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0
