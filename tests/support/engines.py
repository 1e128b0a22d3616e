"""Engine availability and the user-facing parity command, shared by the engine suites."""

from __future__ import annotations

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


def assert_parity_command_passes(checkpoint: str, engine: str) -> None:
    """Run the user-facing `fmbc parity DIR --engine ENGINE` as users do and require a PASS."""
    fmbc = str(Path(sys.executable).parent / "fmbc")
    result = subprocess.run([fmbc, "parity", checkpoint, "--engine", engine, "--max-new-tokens", "8"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert f"{engine}: greedy tokens all equal" in result.stdout and "PASS" in result.stdout
