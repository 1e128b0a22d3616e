"""Stock engines serving an FMBC checkpoint from its folder's own code, through their Transformers backends
(`--model-impl transformers --trust-remote-code`), with fmbc-serve absent from the server's process: its plugin
switched off by the engine's own filter (VLLM_PLUGINS=none, SGLANG_PLUGINS=none), and every import of
`fmbc_serve` or `fmbc_kernels` made to fail there (`without_fmbc_serve`), so nothing of ours but the checkpoint
folder's three files can take part. vLLM serves the embedded default and a parallel-residual checkpoint with
greedy parity; SGLang's backend cannot run on a CPU for any model, stock GPT-NeoX included (the test that shows
it fails the day it can). Run with `pytest -s` to see the figures."""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

import pytest
import requests
import torch
from support.engines import require
from support.servers import ENGINE_ENV

from fmbc_serve.devtools.servers import free_port, running_server
from fmbc_serve.parity import Completion, compare, reference_greedy
from fmbc_serve.tolerances import FP32_PARITY

DEFAULT = str(files("fmbc_serve") / "default_model")
PROMPTS = [[72, 101, 108, 108, 111], list(range(1, 60)), [300, 0, 301, 5, 5, 9]]
NEW_TOKENS = 12
BLOCKED = ("fmbc_serve", "fmbc_kernels")


@pytest.fixture(scope="module")
def without_fmbc_serve(tmp_path_factory) -> dict[str, str]:
    """The environment of a server that must run without fmbc-serve: first on its path, a package of each of our
    names that raises on import, so that any import of ours (a plugin, a helper) fails and is seen."""
    folder = tmp_path_factory.mktemp("without-fmbc-serve")
    for name in BLOCKED:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} was imported in a server that runs "
                                                   "without fmbc-serve')\n")
    return {**ENGINE_ENV, "PYTHONPATH": str(folder), "VLLM_PLUGINS": "none", "SGLANG_PLUGINS": "none"}


def served_greedy(url: str, prompt: list[int]) -> Completion:
    """Greedy tokens and logprobs (the prompt's too, by echo) from /v1/completions."""
    reply = requests.post(url + "/v1/completions", timeout=300, json={
        "model": "fmbc", "prompt": prompt, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS, "ignore_eos": True,
        "temperature": 0, "logprobs": 1, "echo": True, "return_tokens_as_token_ids": True})
    assert reply.status_code == 200, reply.text
    logprobs = reply.json()["choices"][0]["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]]
    n = len(prompt)
    assert tokens[:n] == prompt
    return Completion(tokens[n:], logprobs["token_logprobs"][n:], logprobs["token_logprobs"][1:n])


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["default", "parallel"])
def test_vllm_transformers_backend_serves_fmbc_from_the_folders_code(
        name: str, without_fmbc_serve: dict[str, str], parallel_block_checkpoints: dict[str, str],
        tmp_path: Path) -> None:
    """vLLM's stock OpenAI server (`python -m vllm.entrypoints.openai.api_server`: the CPU build's `vllm` command
    needs our launcher) with `--model-impl transformers --trust-remote-code`: its backend finds our attention module
    on transformers' attention interface and serves greedy tokens equal to the reference's, logprobs within
    FP32_PARITY, for the embedded default (sequential) and a parallel-residual checkpoint (partial rotary,
    biases)."""
    require("vllm")
    checkpoint = DEFAULT if name == "default" else parallel_block_checkpoints["parallel"]
    port, log = free_port(), tmp_path / "server.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
               "--model-impl", "transformers", "--trust-remote-code", "--dtype", "float32",
               "--served-model-name", "fmbc", "--host", "127.0.0.1", "--port", str(port)]
    with running_server(command, port, log, env=without_fmbc_serve, timeout=600) as url:
        served = [served_greedy(url, prompt) for prompt in PROMPTS]
    text = log.read_text()
    assert "Using Transformers modeling backend" in text and "(FMBCAttention) -> attention interface" in text
    assert "without fmbc-serve" not in text
    rows = [compare(ref, eng, len(p)) for ref, eng, p in zip(reference_greedy(checkpoint, PROMPTS, NEW_TOKENS),
                                                              served, PROMPTS, strict=True)]
    print(f"\nvLLM Transformers backend, {name}: per prompt (tokens equal, max |Δlogprob|): "
          f"{[(r.agree, f'{r.max_delta:.1e}') for r in rows]}")
    assert all(row.agree and row.max_delta <= FP32_PARITY for row in rows), rows


def stock_gpt_neox(folder: Path) -> str:
    """A small stock GPT-NeoX (transformers' own class, no remote code) with the embedded default's tokenizer."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=256, max_position_embeddings=256)
    GPTNeoXForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.sglang
def test_sglang_transformers_backend_stops_on_a_cpu_for_stock_models_and_fmbc_alike(
        without_fmbc_serve: dict[str, str], tmp_path: Path) -> None:
    """SGLang's stock server with `--model-impl transformers --device cpu` builds the model on the meta device and
    then materialises its parameters on `sglang.srt.utils.common.get_device()`, which on a CPU asks the current
    platform, whose `get_device` raises NotImplementedError ("No accelerator ... or platform plugin is available").
    A stock GPT-NeoX dies there; FMBC, from its folder's code, gets as far: SGLang's backend accepted it (its
    config, the attention interface) and built it, and it dies at the same line. The day the stock model serves,
    this fails: then FMBC's parity on this backend must be tested here, as vLLM's is."""
    require("sglang")
    for name, checkpoint in (("stock GPT-NeoX", stock_gpt_neox(tmp_path / "gpt-neox")), ("FMBC", DEFAULT)):
        port, log = free_port(), tmp_path / f"{name}.log"
        command = [sys.executable, "-m", "sglang.launch_server", "--model-path", checkpoint, "--model-impl",
                   "transformers", "--trust-remote-code", "--device", "cpu", "--host", "127.0.0.1",
                   "--port", str(port)]
        with pytest.raises(RuntimeError, match="server exited"), running_server(
                command, port, log, env=without_fmbc_serve, timeout=600):
            pass
        text = log.read_text()
        assert "Using Transformers backend." in text, text[-3000:]
        assert "in _init_parameters" in text and "No accelerator (CUDA, XPU, HPU, NPU, MUSA, MPS) or platform " \
            "plugin is available." in text, text[-3000:]
        assert "without fmbc-serve" not in text
        print(f"\nSGLang Transformers backend on a CPU, {name}: built, then stopped in _init_parameters "
              "(get_device: NotImplementedError)")
