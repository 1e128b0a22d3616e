"""Engine availability, scripts run in the engine's own Python, and the user-facing parity command, shared by the
engine suites."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest


def require(module: str) -> ModuleType:
    """Import an engine module; in the engine's own CI run (FMBC_REQUIRE_ENGINE=1) a missing engine fails the run
    instead of skipping it."""
    if os.environ.get("FMBC_REQUIRE_ENGINE") == "1":
        return __import__(module)
    return pytest.importorskip(module)


def run_engine_script(script: str, args: list[str], folder: Path, count: int, env: dict[str, str] | None = None,
                      timeout: float = 1200) -> list:
    """Run `script` (a Python file's text, which prints one `RESULT {json}` line per result) with the engine
    environment's Python in a process of its own, from `folder`, and return the `count` results it printed. The
    engines start worker processes and keep global state: one process per run keeps them from the test session."""
    path = folder / "engine_script.py"
    path.write_text(script)
    run = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=timeout,
                         cwd=folder, env={**os.environ, **(env or {})})
    results = [json.loads(line[len("RESULT "):]) for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and len(results) == count, run.stderr[-4000:]
    return results


def assert_parity_command_passes(checkpoint: str, engine: str) -> None:
    """Run the user-facing `fmbc parity DIR --engine ENGINE` as users do and require a PASS."""
    fmbc = str(Path(sys.executable).parent / "fmbc")
    result = subprocess.run([fmbc, "parity", checkpoint, "--engine", engine, "--max-new-tokens", "8"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"{engine}: greedy tokens all equal" in result.stdout and "PASS" in result.stdout
