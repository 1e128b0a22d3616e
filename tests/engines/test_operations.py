"""What a deployment relies on beyond plain completions, on both engines' real servers: structured output
(JSON schema), prefix caching and chunked prefill with the reference's tokens and logprobs, Prometheus
/metrics, one log line per rejected request, 404 for an unknown model name, and the API-key check.

Two servers per engine:
- `fmbc serve` as users start it (embedded default model, 127.0.0.1, `--api-key`), plus prefix caching, a
  64-token prefill chunk and JSON without free whitespace (shared with the examples' tests);
- the engine's own server on a character-tokenizer checkpoint with V = 65,536, whose vocabulary holds the
  `<U+D800>`..`<U+DFFF>` placeholders for the surrogate code points that the grammar backend must cope with.
"""

from __future__ import annotations

import json
import re
import uuid

import pytest
import requests
from support.engines import require
from support.servers import API_KEY, ENGINE_ENV, NO_FREE_WHITESPACE, PREFILL_CHUNK, Server

from fmbc_serve.devtools.servers import free_port, running_server
from fmbc_serve.parity import reference_greedy
from fmbc_serve.serve import DEFAULT_MODEL
from fmbc_serve.tolerances import FP32_PARITY

ENGINES = [pytest.param("vllm", marks=pytest.mark.vllm), pytest.param("sglang", marks=pytest.mark.sglang)]
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
                   "confidence": {"type": "integer", "minimum": 0, "maximum": 9},
                   "checked": {"type": "boolean"}},
    "required": ["answer", "confidence", "checked"],
    "additionalProperties": False,
}
# Prometheus series a deployment should watch (docs/operations.md), by engine.
METRICS = {
    "vllm": ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
             "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:prompt_tokens_total",
             "vllm:generation_tokens_total", "vllm:e2e_request_latency_seconds_bucket",
             "vllm:time_to_first_token_seconds_bucket", "vllm:request_success_total", "http_requests_total"],
    "sglang": ["sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage", "sglang:cache_hit_rate",
               "sglang:prompt_tokens_total", "sglang:generation_tokens_total",
               "sglang:e2e_request_latency_seconds_bucket", "sglang:time_to_first_token_seconds_bucket",
               "sglang:http_responses_total"],
}


@pytest.fixture(scope="module", params=ENGINES)
def engine(request) -> str:
    require(request.param)
    return request.param


@pytest.fixture(scope="module")
def default_server(engine: str, default_model_server) -> Server:
    """`fmbc serve --engine ENGINE --api-key KEY` on the default model, as users start it (shared with the
    examples: tests/engines/conftest.py)."""
    return default_model_server(engine)


@pytest.fixture(scope="module")
def char_server(engine: str, tmp_path_factory):
    """The engine's own server command (fmbc serve's, without a key) on a V = 65,536 character-tokenizer
    checkpoint."""
    from fmbc_serve.checkpoint import init_checkpoint, make_config
    from fmbc_serve.engines import runner

    root = tmp_path_factory.mktemp(f"char-{engine}")
    model = str(init_checkpoint(make_config("tiny", vocab_size=65536), root / "char", seed=3))
    port = free_port()
    command, env = runner(engine).server_command(model, "127.0.0.1", port, "char", cuda=False)
    command += NO_FREE_WHITESPACE[engine] + (["--dtype", "float32"] if engine == "vllm" else [])
    with running_server(command, port, root / "server.log", env={**ENGINE_ENV, **env}, timeout=600) as url:
        yield Server(url, "char", root / "server.log", None)


def structured_reply(server: Server) -> str:
    body = {"model": server.model, "messages": [{"role": "user", "content": "Is the sky blue? Answer in JSON."}],
            "max_tokens": 120, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}}
    reply = server.post("/v1/chat/completions", body)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def assert_matches_schema(text: str) -> dict:
    value = json.loads(text)
    assert set(value) == set(SCHEMA["required"]), value
    assert value["answer"] in ("yes", "no", "maybe") and isinstance(value["checked"], bool)
    assert isinstance(value["confidence"], int) and 0 <= value["confidence"] <= 9
    return value


def test_json_schema_default_model(default_server: Server, engine: str) -> None:
    """The OpenAI SDK's response_format with a JSON schema, on the embedded default model (BPE tokenizer)."""
    from openai import OpenAI

    client = OpenAI(base_url=default_server.url + "/v1", api_key=API_KEY)
    reply = client.chat.completions.create(
        model=default_server.model, messages=[{"role": "user", "content": "Is the sky blue? Answer in JSON."}],
        max_tokens=120, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}})
    value = assert_matches_schema(reply.choices[0].message.content)
    print(f"\n{engine} JSON schema, default model: {value}")


def test_json_schema_character_tokenizer(char_server: Server, engine: str) -> None:
    """The same on a character-tokenizer checkpoint whose vocabulary has the surrogate placeholders."""
    text = structured_reply(char_server)
    assert "<U+D" not in text
    print(f"\n{engine} JSON schema, character tokenizer V=65536: {assert_matches_schema(text)}")


def default_model_prompt(words: int) -> list[int]:
    """A prompt in the default model's own tokens, unique per run (so its first serving is a cold run)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    text = f"{uuid.uuid4().hex} " + " ".join(["And God said, Let there be light: and there was light."] * words)
    return tokenizer(text)["input_ids"]


def generate(server: Server, engine: str, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float], int]:
    """Greedy tokens, their logprobs and (SGLang) the prompt tokens read from the prefix cache, through the OpenAI
    completions endpoint (vLLM: the cache hits are only in /metrics) or /generate (SGLang)."""
    if engine == "vllm":
        body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 0,
                "ignore_eos": True, "return_tokens_as_token_ids": True}
        reply = server.post("/v1/completions", body)
        assert reply.status_code == 200, reply.text
        logprobs = reply.json()["choices"][0]["logprobs"]
        return [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]], logprobs["token_logprobs"], 0
    body = {"input_ids": prompt, "return_logprob": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": max_tokens, "ignore_eos": True}}
    reply = server.post("/generate", body)
    assert reply.status_code == 200, reply.text
    meta = reply.json()["meta_info"]
    output = meta["output_token_logprobs"]
    return [t for _, t, _ in output], [lp for lp, _, _ in output], meta["cached_tokens"]


def scrape(server: Server) -> dict[str, float]:
    """Prometheus text from /metrics (open without the API key) as {series with labels: value}."""
    reply = requests.get(server.url + "/metrics", timeout=30)
    assert reply.status_code == 200, reply.text[:500]
    series = {}
    for line in reply.text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            series[name] = float(value)
    return series


def series_total(series: dict[str, float], name: str) -> float:
    return sum(v for k, v in series.items() if k == name or k.startswith(name + "{"))


def test_prefix_cache_and_chunked_prefill_match_the_reference(default_server: Server, engine: str) -> None:
    """A prompt of ~5 chunks: its cold run (chunked prefill) and its repeat (served from the prefix cache, as
    the engine's own counters show) both give the reference's greedy tokens and logprobs."""
    prompt = default_model_prompt(40)
    assert len(prompt) > 4 * PREFILL_CHUNK
    (expected,) = reference_greedy(str(DEFAULT_MODEL), [prompt], 8)
    before = scrape(default_server)
    cold_tokens, cold, cold_cached = generate(default_server, engine, prompt, 8)
    warm_tokens, warm, hits = generate(default_server, engine, prompt, 8)
    after = scrape(default_server)
    if engine == "vllm":
        hits = (series_total(after, "vllm:prefix_cache_hits_total")
                - series_total(before, "vllm:prefix_cache_hits_total"))
    assert cold_cached == 0
    assert hits >= len(prompt) // 2, f"prefix cache hit only {hits} of {len(prompt)} tokens"
    assert cold_tokens == warm_tokens == expected.tokens
    cache_delta = max(abs(a - b) for a, b in zip(cold, warm, strict=True))
    reference_delta = max(abs(a - b) for a, b in zip(cold + warm, expected.token_logprobs * 2, strict=True))
    print(f"\n{engine}: prompt {len(prompt)} tokens in chunks of {PREFILL_CHUNK}; prefix cache hit {hits:.0f} tokens; "
          f"max |Δlogprob| cached vs cold {cache_delta:.2e}, vs reference {reference_delta:.2e}")
    assert cache_delta <= FP32_PARITY and reference_delta <= FP32_PARITY


def test_metrics_are_scraped(default_server: Server, engine: str) -> None:
    """The series of docs/operations.md, after one request (SGLang creates its request series on the first)."""
    body = {"model": default_server.model, "prompt": "And God said,", "max_tokens": 4}
    assert default_server.post("/v1/completions", body).ok
    series = scrape(default_server)
    names = {re.sub(r"\{.*", "", key) for key in series}
    print(f"\n{engine} /metrics: {len(names)} series names, e.g. {sorted(names)[:8]}")
    missing = [name for name in METRICS[engine] if name not in names]
    assert not missing, f"not in {engine}'s /metrics: {missing}"


def test_api_key(default_server: Server) -> None:
    body = {"model": default_server.model, "prompt": "And God said,", "max_tokens": 4}
    assert default_server.post("/v1/completions", body, headers={}).status_code == 401
    assert default_server.post("/v1/completions", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert default_server.post("/v1/completions", body).status_code == 200
    assert requests.get(default_server.url + "/health", timeout=10).status_code == 200  # probes need no key


def test_fmbc_serve_listens_on_localhost(default_server: Server) -> None:
    started = next(line for line in default_server.log.read_text().splitlines()
                   if line.startswith("fmbc serve: starting"))
    assert "--host 127.0.0.1" in started and API_KEY not in started


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404_naming_the_served_model(default_server: Server, path: str, stream: bool) -> None:
    """Both engines answer vLLM's 404 body; on SGLang it also names the served model."""
    payload = {"prompt": "Hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    reply = default_server.post(path, {"model": "no-such-model", "max_tokens": 2, "stream": stream, **payload})
    assert reply.status_code == 404, reply.text
    error = reply.json()["error"]
    assert error["type"] == "NotFoundError" and error["code"] == 404 and error["param"] == "model"
    assert error["message"].startswith("The model `no-such-model` does not exist.")
    assert default_server.post(path, {"max_tokens": 2, **payload}).status_code == 200  # no name: the served model
    assert default_server.post(path, {"model": default_server.model, "max_tokens": 2, **payload}).status_code == 200


def test_rejections_are_logged_once_with_the_reason(default_server: Server, engine: str) -> None:
    """A rejected request leaves one log line with its reason: our hooks' WARNING on SGLang, vLLM's own
    access-log line (status only) on vLLM, where the rejections are vLLM's own validation."""
    bad_id = 4096 + int(uuid.uuid4().int % 100000)
    model = default_server.model
    reply = default_server.post("/v1/completions", {"model": model, "prompt": [1, bad_id], "max_tokens": 2})
    assert reply.status_code == 400 and "out of vocabulary" in reply.text
    good = default_server.post("/v1/completions", {"model": model, "prompt": [1, 2], "max_tokens": 2})
    assert good.status_code == 200
    log = default_server.log.read_text()
    if engine == "sglang":
        lines = [line for line in log.splitlines() if "fmbc-serve rejected request" in line and str(bad_id) in line]
        assert len(lines) == 1, lines
        assert f"token id {bad_id} is out of vocabulary" in lines[0]
    else:
        assert '"POST /v1/completions HTTP/1.1" 400' in log
