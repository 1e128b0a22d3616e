"""A quantized FMBC checkpoint (compressed-tensors W8A8, written by llm-compressor through `fmbc quantize`)
served by vLLM's OpenAI server on CPU, against the full-precision reference; the load policy's errors for
quantized layers; and SGLang's documented CPU failure for the same checkpoint."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.engines import require
from support.servers import ENGINE_ENV

from fmbc_serve.devtools.servers import free_port, running_server
from fmbc_serve.parity import Completion, compare_close
from fmbc_serve.tolerances import W8A8_BF16_LOGPROB

PROMPTS = [[72, 101, 108, 108, 111], list(range(1, 60)), [300, 301, 302, 5, 5, 5, 9, 100]]
NEW_TOKENS = 16
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[str, str]:
    """(full-precision tiny checkpoint, its W8A8 copy made by `fmbc quantize`, i.e. llm-compressor, in the quant
    environment that scripts/venv.sh builds on first use: it cannot share the engine's environment)."""
    import subprocess

    from fmbc_serve.checkpoint import init_checkpoint, make_config

    root = tmp_path_factory.mktemp("quant")
    full = init_checkpoint(make_config("tiny"), root / "fp32", seed=0)
    # The first build takes a while (docs/quantization.md says how long); its progress goes to the test's stderr.
    venv = subprocess.run(["bash", str(ROOT / "scripts" / "venv.sh"), "quant"], stdout=subprocess.PIPE, text=True,
                          timeout=1800, check=True).stdout.split()[-1]
    subprocess.run([str(Path(venv) / "bin" / "fmbc"), "quantize", str(full), "--out", str(root / "w8a8"),
                    "--scheme", "W8A8"], check=True, timeout=300)
    return str(full), str(root / "w8a8")


def test_quantize_without_llmcompressor_names_the_fix(tiny_checkpoints, tmp_path: Path, capsys) -> None:
    """Where llm-compressor is not installed (the engine and core environments), the CLI says how to get it."""
    import importlib.util

    from fmbc_serve.cli import main

    if importlib.util.find_spec("llmcompressor") is not None:
        pytest.skip("llm-compressor is installed here")
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", tiny_checkpoints["binary"], "--out", str(tmp_path / "w8a8")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "fmbc quantize: error: fmbc quantize needs llm-compressor" in error
    assert "bash scripts/venv.sh quant" in error and "pip install 'fmbc-serve[quantize]'" in error
    assert not (tmp_path / "w8a8").exists()


@pytest.mark.vllm
def test_w8a8_served_by_vllm_is_close_to_full_precision(checkpoints, tmp_path) -> None:
    """Served in bfloat16: vLLM's CPU int8 kernel quantizes bf16 activations only on machines with AMX
    ("int8_scaled_mm_with_quant: expect A to be bfloat16 or half"), and bf16 is what a GPU serves by default.
    Judged by the full-precision reference in bf16 on the served tokens (`compare_close`)."""
    import requests

    require("vllm")
    full, quantized = checkpoints
    sizes = [(Path(d) / "model.safetensors").stat().st_size for d in (full, quantized)]
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", quantized, "--port", str(port),
               "--host", "127.0.0.1", "--dtype", "bfloat16"]
    log = tmp_path / "server.log"
    with running_server(command, port, log, env=ENGINE_ENV) as base_url:
        served = []
        for prompt in PROMPTS:
            body = {"model": quantized, "prompt": prompt, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS,
                    "ignore_eos": True, "temperature": 0, "logprobs": 1, "return_tokens_as_token_ids": True}
            reply = requests.post(base_url + "/v1/completions", json=body, timeout=120)
            assert reply.status_code == 200, reply.text
            logprobs = reply.json()["choices"][0]["logprobs"]
            served.append(Completion([int(t.removeprefix("token_id:")) for t in logprobs["tokens"]],
                                     logprobs["token_logprobs"], []))
    rows = compare_close(full, PROMPTS, served, torch.bfloat16)
    tie_gap, delta = max(r.max_tie_gap for r in rows), max(r.max_logprob_delta for r in rows)
    print(f"\nvLLM W8A8 (bf16): the reference's top token at {sum(r.reference_argmax for r in rows)}/"
          f"{sum(r.steps for r in rows)} steps, max tie gap {tie_gap:.3f}, max |Δlogprob| {delta:.3f} vs the "
          f"full-precision reference in bf16; model.safetensors {sizes[1]} vs {sizes[0]} bytes "
          f"({sizes[1] / sizes[0]:.2f}x)")
    assert tie_gap <= W8A8_BF16_LOGPROB and delta <= W8A8_BF16_LOGPROB
    assert "Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8" in log.read_text()


@pytest.mark.vllm
def test_quantized_load_errors_name_the_tensors(checkpoints, tmp_path: Path) -> None:
    require("vllm")
    from fmbc_serve.engines.vllm.runner import greedy

    _, quantized = checkpoints
    broken = tmp_path / "broken"
    shutil.copytree(quantized, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight_scale"]
    weights["model.layers.0.mlp.up_proj.weight_scale"] = weights["model.layers.0.mlp.up_proj.weight_scale"][:7]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match=r"missing tensor model\.layers\.1\.self_attn\.k_proj\.weight_scale") as err:
        greedy(str(broken), [[1, 2, 3]], 2)
    assert "model.layers.0.mlp.up_proj.weight_scale has shape [7, 1]" in str(err.value)


@pytest.mark.vllm
def test_inspect_reads_a_quantized_checkpoint(checkpoints, tmp_path: Path, capsys) -> None:
    """`fmbc inspect` counts the quantized layers instead of calling their scales unexpected, and names an int8
    weight whose scales are gone (the scales' shapes are the engine's quantization method to check)."""
    from fmbc_serve.cli import main

    _, quantized = checkpoints
    assert main(["inspect", quantized]) == 0
    out = capsys.readouterr().out
    assert "quantization        compressed-tensors int-quantized: 12 layers quantized" in out
    assert "tensors             ok" in out
    broken = tmp_path / "broken"
    shutil.copytree(quantized, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight_scale"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    assert main(["inspect", str(broken)]) == 1
    assert ("error: tensor model.layers.1.self_attn.k_proj.weight is int8, not a floating-point weight: a quantized "
            "weight needs its layer's scales" in capsys.readouterr().err)


# SGLang 0.5.23 takes compressed-tensors in float16/bfloat16 only, and its scheme check then asks CUDA for the
# device's compute capability: no compressed-tensors scheme loads on a machine without a GPU (docs/quantization.md).
SGLANG_CPU_QUANT_ERRORS = {
    "float32": "torch.float32 is not supported for quantization method compressed-tensors",
    "bfloat16": "Found no NVIDIA driver on your system",
}


@pytest.mark.sglang
@pytest.mark.parametrize("dtype", SGLANG_CPU_QUANT_ERRORS)
def test_sglang_compressed_tensors_on_cpu_fails_with_the_documented_error(checkpoints, dtype: str) -> None:
    import subprocess

    import torch

    from fmbc_serve.engines.sglang.runner import server_command

    require("sglang")
    assert not torch.cuda.is_available(), "on a GPU machine, test SGLang's quantized serving instead"
    _, quantized = checkpoints
    command, env = server_command(quantized, "127.0.0.1", free_port(), "fmbc-w8a8", cuda=False)
    command[command.index("--dtype") + 1] = dtype
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert result.returncode != 0
    assert SGLANG_CPU_QUANT_ERRORS[dtype] in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
