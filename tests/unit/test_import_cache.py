"""`fmbc serve SRC --trust-remote-code` on a cache that replicas share: two starts at once end up serving one
import, the import is readable by other users, an import killed midway leaves nothing a later start trips over
or serves, and two explicit imports into one folder never mix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fmbc_serve.devtools.foreign import write_foreign
from fmbc_serve.importer import REPORT_FILE
from fmbc_serve.importer.pipeline import IMPORT_MODE

# Resolve SRC's import in the cache as `fmbc serve` does (without starting an engine) and print the folder.
RESOLVE = ("import sys; from fmbc_serve.serve import checkpoint_to_serve; "
           "print('SERVE', checkpoint_to_serve(sys.argv[1], trust_remote_code=True))")
FMBC = str(Path(sys.executable).parent / "fmbc")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    return write_foreign("pythia", tmp_path_factory.mktemp("src") / "pythia")


def start_resolve(src: str, cache: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RESOLVE, src], env={**os.environ, "FMBC_IMPORT_CACHE": str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def served_folder(proc: subprocess.Popen) -> tuple[Path, str]:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return Path(next(line for line in out.splitlines() if line.startswith("SERVE ")).split(" ", 1)[1]), out


def cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def test_two_starts_at_once_serve_one_import(source: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, second = start_resolve(source, cache), start_resolve(source, cache)
    (folder_a, log_a), (folder_b, log_b) = served_folder(first), served_folder(second)
    assert folder_a == folder_b
    assert (folder_a / REPORT_FILE).is_file()
    assert cache_entries(cache) == [folder_a.name]  # no staging folder left, no second import
    assert sum("importing it into" in log for log in (log_a, log_b)) == 1, (log_a, log_b)
    assert any("reusing" in log for log in (log_a, log_b))
    assert folder_a.stat().st_mode & 0o777 == IMPORT_MODE  # a replica running as another user can read it


def test_an_import_killed_midway_leaves_nothing_in_the_way(source: str, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    killed = start_resolve(source, cache)
    deadline = time.monotonic() + 300
    while not (cache.is_dir() and any(p.name.startswith(".") for p in cache.iterdir())):  # its staging folder
        assert killed.poll() is None and time.monotonic() < deadline, "the import never started staging"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert not any((p / REPORT_FILE).is_file() for p in cache.iterdir() if p.is_dir()), "half an import is served"
    folder, _ = served_folder(start_resolve(source, cache))
    assert (folder / REPORT_FILE).is_file()
    assert cache_entries(cache) == [folder.name]


def test_two_imports_into_one_folder_never_mix(source: str, tmp_path: Path) -> None:
    """Explicit `fmbc import --out` has no lock (it never overwrites): of two at once, one writes the folder and
    the other is refused in one line, whichever step it had reached."""
    out = tmp_path / "out"
    procs = [subprocess.Popen([FMBC, "import", source, "--out", str(out), "--trust-remote-code"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(proc.wait(timeout=600), proc.stderr.read()) for proc in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refusal = next(err for code, err in results if code == 2).strip().splitlines()[-1]  # after its progress bars
    assert refusal.startswith("fmbc import: error: ") and ("written by another import meanwhile" in refusal
                                                           or "exists and is not empty" in refusal), refusal
    assert (out / REPORT_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
