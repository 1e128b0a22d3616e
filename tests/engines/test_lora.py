"""LoRA adapters made with PEFT on the reference, served by the engines' OpenAI servers: one server holds the
base model and three adapters (more than it batches at once); each adapter's greedy completion equals the
reference with that PEFT adapter applied, and the base model's answers are those of the plain reference."""

from __future__ import annotations

import os
import sys

import pytest
from support.checkpoints import LORA_TARGETS, make_lora_adapter
from support.engines import require
from support.servers import ENGINE_ENV

from fmbc_serve.devtools.servers import free_port, running_server
from fmbc_serve.parity import Completion, compare, reference_greedy
from fmbc_serve.tolerances import FP32_PARITY

PROMPTS = [[72, 101, 108, 108, 111], list(range(1, 60)), [300, 301, 302, 5, 5, 5, 9, 100]]
NEW_TOKENS = 16
ADAPTERS = ("adapter-a", "adapter-b")


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> str:
    from fmbc_serve.checkpoint import init_checkpoint, make_config

    return str(init_checkpoint(make_config("tiny"), tmp_path_factory.mktemp("lora") / "base", seed=0))


def make_adapters(checkpoint: str, root, engine: str) -> dict[str, str]:
    """Two different PEFT adapters on `checkpoint`, on the projections `engine` takes adapters for."""
    return {name: make_lora_adapter(checkpoint, root / name, seed=seed, targets=LORA_TARGETS[engine])
            for seed, name in enumerate(ADAPTERS, start=1)}


def assert_matches_reference(label: str, engine: list[Completion], reference: list[Completion]) -> None:
    rows = [compare(ref, eng, len(prompt)) for ref, eng, prompt in zip(reference, engine, PROMPTS, strict=True)]
    worst = max(row.max_delta for row in rows)
    print(f"\n{label}: greedy equal {[row.agree for row in rows]}, max |Δlogprob| {worst:.3e}")
    assert all(row.agree for row in rows)
    assert worst <= FP32_PARITY


# ---------------------------------------------------------------- vLLM


def vllm_completion(base_url: str, model: str, prompt: list[int]) -> Completion:
    """Greedy ids and logprobs, the prompt's included (`echo`), through vLLM's /v1/completions; ids come back as
    `token_id:N` (`return_tokens_as_token_ids`)."""
    import requests

    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS, "ignore_eos": True,
            "temperature": 0, "logprobs": 1, "echo": True, "return_tokens_as_token_ids": True}
    reply = requests.post(base_url + "/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    logprobs = reply.json()["choices"][0]["logprobs"]
    tokens = [int(token.removeprefix("token_id:")) for token in logprobs["tokens"]]
    assert tokens[:len(prompt)] == prompt
    n = len(prompt)
    return Completion(tokens[n:], logprobs["token_logprobs"][n:], logprobs["token_logprobs"][1:n])


@pytest.fixture(scope="module")
def vllm_lora_server(base_checkpoint, tmp_path_factory):
    require("vllm")
    root = tmp_path_factory.mktemp("vllm-lora")
    adapters = make_adapters(base_checkpoint, root, "vllm")
    # PEFT's usual choice (q and v only: vLLM fills k's share of the packed qkv_proj with zeros), a smaller rank,
    # and the output head.
    adapters["adapter-qv-head"] = make_lora_adapter(base_checkpoint, root / "adapter-qv-head", seed=3,
                                                    targets=["q_proj", "v_proj", "lm_head"], rank=4)
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base_checkpoint,
               "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--enable-lora",
               "--max-lora-rank", "8", "--max-loras", "2",
               "--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    with running_server(command, port, root / "server.log", env=ENGINE_ENV) as base_url:
        yield base_url, adapters


@pytest.mark.vllm
def test_vllm_serves_two_adapters_and_the_base_like_the_reference(vllm_lora_server, base_checkpoint) -> None:
    import requests

    base_url, adapters = vllm_lora_server
    served = [m["id"] for m in requests.get(base_url + "/v1/models", timeout=10).json()["data"]]
    assert served == [base_checkpoint, *adapters]
    results = {}
    for name, adapter in [(base_checkpoint, None), *adapters.items()]:
        engine = [vllm_completion(base_url, name, prompt) for prompt in PROMPTS]
        reference = reference_greedy(base_checkpoint, PROMPTS, NEW_TOKENS, adapter=adapter)
        assert_matches_reference(f"vLLM LoRA {name if adapter else 'base'}", engine, reference)
        results[name] = [c.tokens for c in engine]
    # The adapters really change the model, and differently.
    assert len({str(tokens) for tokens in results.values()}) == 1 + len(adapters)


# ---------------------------------------------------------------- SGLang

# SGLang 0.5.23's LoRA layers and backends allocate pinned host memory (`pin_memory=True`), which needs a CUDA
# driver: on a machine without a GPU the scheduler dies while wrapping the first projection (docs/lora.md).
SGLANG_CPU_LORA_ERROR = "Found no NVIDIA driver on your system"


@pytest.mark.sglang
def test_sglang_lora_on_cpu_fails_at_start_with_the_documented_error(base_checkpoint, tmp_path) -> None:
    """The documented CPU behaviour, so that a SGLang release that lifts it shows up here."""
    import subprocess

    import torch

    from fmbc_serve.engines.sglang.runner import server_command

    require("sglang")
    assert not torch.cuda.is_available(), "on a GPU machine, test SGLang LoRA parity instead"
    adapters = make_adapters(base_checkpoint, tmp_path, "sglang")
    command, env = server_command(base_checkpoint, "127.0.0.1", free_port(), "fmbc-tiny", cuda=False)
    command += ["--enable-lora", "--max-lora-rank", "8", "--lora-backend", "torch_native", "--lora-paths",
                *(f"{name}={path}" for name, path in adapters.items())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert result.returncode != 0
    assert SGLANG_CPU_LORA_ERROR in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]

