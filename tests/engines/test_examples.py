"""Every example in examples/ runs against the real engines on CPU, and `fmbc serve` serves the embedded model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.servers import ENGINE_ENV, Server

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ENGLISH = re.compile(r"\b(the|and|of|unto|shall|his|he|they|that|them)\b")


def bin_path(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_example(command: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=EXAMPLES,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def api_key_env(server: Server) -> dict[str, str]:
    """The environment an example reads the server's API key from."""
    return {"OPENAI_API_KEY": server.api_key}


# The request on the model card, verbatim apart from the model name.
MODEL_CARD_REQUEST = {"model": "fmbc", "prompt": "Once upon a time,", "max_tokens": 512, "temperature": 0.5}


@pytest.fixture(scope="module")
def vllm_server(default_model_server) -> Server:
    """`fmbc serve` on the embedded default model, through vLLM on this CPU, with an API key (shared with the
    operations tests: tests/engines/conftest.py); the examples read the key from OPENAI_API_KEY, as the OpenAI
    SDKs and lm-eval do."""
    return default_model_server("vllm")


def assert_model_card_request_answered(server: Server) -> None:
    """The card's request answers 200 with 512 tokens of English (the embedded model has a 1,024-token context)."""
    reply = server.post("/v1/completions", MODEL_CARD_REQUEST)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["completion_tokens"] == 512, body["usage"]
    assert len(ENGLISH.findall(body["choices"][0]["text"])) >= 50, body["choices"][0]["text"]


@pytest.mark.vllm
def test_fmbc_serve_answers_the_model_card_request(vllm_server: Server) -> None:
    assert_model_card_request_answered(vllm_server)


@pytest.mark.sglang
def test_fmbc_serve_sglang_answers_the_model_card_request(default_model_server) -> None:
    assert_model_card_request_answered(default_model_server("sglang"))


@pytest.mark.vllm
def test_fmbc_serve_answers_the_seed_curl_with_english(vllm_server: Server) -> None:
    log = vllm_server.log
    deadline = time.monotonic() + 60  # fmbc serve polls /health itself, so its message may trail ours
    while "is ready after" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(1)
    assert "is ready after" in log.read_text() and "curl http://127.0.0.1" in log.read_text()
    reply = json.loads(run_example(["bash", "curl.sh"], env={"BASE_URL": vllm_server.url,
                                                            **api_key_env(vllm_server)}))
    text = reply["choices"][0]["text"]
    assert reply["model"] == "fmbc" and len(ENGLISH.findall(text)) >= 3, text


@pytest.mark.vllm
def test_openai_sdk_example(vllm_server: Server) -> None:
    out = run_example([sys.executable, "openai_sdk.py", "--base-url", vllm_server.url + "/v1"],
                      env=api_key_env(vllm_server))
    completion = re.search(r"^completion: (.*)$", out, re.M).group(1)
    assert ENGLISH.search(completion) and "stream:" in out and out.count("logprobs:") == 5


@pytest.mark.vllm
def test_score_prompt_example_prefers_the_real_verse(vllm_server: Server) -> None:
    out = run_example([sys.executable, "score_prompt.py", "--base-url", vllm_server.url + "/v1"],
                      env=api_key_env(vllm_server))
    real, shuffled = (float(line.split()[0]) for line in out.strip().splitlines())
    assert real > shuffled


@pytest.mark.vllm
def test_lm_eval_example(vllm_server: Server) -> None:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    out = run_example(["bash", "lm_eval_local.sh"], env={"BASE_URL": vllm_server.url, "PATH": path,
                                                         **api_key_env(vllm_server)})
    accuracy = float(re.search(r"\|kjv_cloze\|.*?\|acc\s*\|[^|]*\|\s*([\d.]+)\|", out).group(1))
    assert accuracy >= 0.5, out[-1500:]  # 6 three-way items: chance is 1/3


@pytest.mark.vllm
def test_vllm_offline_example() -> None:
    out = run_example([sys.executable, "vllm_offline.py"], env=ENGINE_ENV)
    lines = [line for line in out.splitlines() if " -> " in line]
    assert len(lines) == 3 and all(ENGLISH.search(line.split(" -> ")[1]) for line in lines), out


@pytest.mark.sglang
def test_sglang_offline_example() -> None:
    out = run_example([sys.executable, "sglang_offline.py"])
    lines = [line for line in out.splitlines() if " -> " in line]
    assert len(lines) == 3 and all(ENGLISH.search(line.split(" -> ")[1]) for line in lines), out
