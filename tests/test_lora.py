"""LoRA adapters made with PEFT on the reference, served by the engines' OpenAI servers: one server holds the
base model and two adapters; each adapter's greedy completion equals the reference with that PEFT adapter
applied, and the base model's answers are those of the plain reference."""

from __future__ import annotations

import sys

import pytest
from conftest import make_lora_adapter, require
from servers import free_port, running_server

from fmbc_serve.parity import Completion, compare, reference_greedy

TOLERANCE = 1e-4
PROMPTS = [[72, 101, 108, 108, 111], list(range(1, 60)), [300, 301, 302, 5, 5, 5, 9, 100]]
NEW_TOKENS = 16
ADAPTERS = ("adapter-a", "adapter-b")


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """A tiny binary-mode checkpoint and two different PEFT adapters on it."""
    from fmbc_serve.checkpoint import init_checkpoint, make_config

    root = tmp_path_factory.mktemp("lora")
    checkpoint = str(init_checkpoint(make_config("tiny"), root / "base", seed=0))
    adapters = {name: make_lora_adapter(checkpoint, root / name, seed=seed)
                for seed, name in enumerate(ADAPTERS, start=1)}
    return checkpoint, adapters


def assert_matches_reference(label: str, engine: list[Completion], reference: list[Completion]) -> None:
    rows = [compare(ref, eng, len(prompt)) for ref, eng, prompt in zip(reference, engine, PROMPTS, strict=True)]
    worst = max(row.max_delta for row in rows)
    print(f"\n{label}: greedy equal {[row.agree for row in rows]}, max |Δlogprob| {worst:.3e}")
    assert all(row.agree for row in rows)
    assert worst <= TOLERANCE


# ---------------------------------------------------------------- vLLM


def vllm_completion(base_url: str, model: str, prompt: list[int]) -> Completion:
    """Greedy ids and their logprobs through vLLM's /v1/completions (ids via `return_tokens_as_token_ids`)."""
    import requests

    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS, "ignore_eos": True,
            "temperature": 0, "logprobs": 1, "return_tokens_as_token_ids": True}
    reply = requests.post(base_url + "/v1/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    logprobs = reply.json()["choices"][0]["logprobs"]
    tokens = [int(token.removeprefix("token_id:")) for token in logprobs["tokens"]]
    return Completion(tokens, logprobs["token_logprobs"], [])


@pytest.fixture(scope="module")
def vllm_lora_server(lora_checkpoint, tmp_path_factory):
    require("vllm")
    checkpoint, adapters = lora_checkpoint
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--port", str(port),
               "--host", "127.0.0.1", "--dtype", "float32", "--enable-lora", "--max-lora-rank", "8",
               "--max-loras", "2", "--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    env = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    with running_server(command, port, tmp_path_factory.mktemp("vllm-lora") / "server.log", env=env) as base_url:
        yield base_url


@pytest.mark.vllm
def test_vllm_serves_two_adapters_and_the_base_like_the_reference(vllm_lora_server, lora_checkpoint) -> None:
    import requests

    checkpoint, adapters = lora_checkpoint
    served = [m["id"] for m in requests.get(vllm_lora_server + "/v1/models", timeout=10).json()["data"]]
    assert served == [checkpoint, *ADAPTERS]
    results = {}
    for name, adapter in [(checkpoint, None), *adapters.items()]:
        engine = [vllm_completion(vllm_lora_server, name, prompt) for prompt in PROMPTS]
        reference = reference_greedy(checkpoint, PROMPTS, NEW_TOKENS, adapter=adapter)
        for ref in reference:  # served completions carry no prompt logprobs (see docs/lora.md)
            ref.prompt_logprobs = []
        assert_matches_reference(f"vLLM LoRA {name if adapter else 'base'}", engine, reference)
        results[name] = [c.tokens for c in engine]
    # The adapters really change the model, and differently.
    assert len({str(tokens) for tokens in results.values()}) == 3
