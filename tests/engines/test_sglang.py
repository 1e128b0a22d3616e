"""SGLang integration: registration (entry point and SGLANG_EXTERNAL_MODEL_PACKAGE), fp32 parity with the
reference model for every input mode, the OpenAI-compatible server, and request validation.

One real server (plain `python -m sglang.launch_server`, registered by the entry point) serves the binary
checkpoint; one offline-engine subprocess, registered only by SGLANG_EXTERNAL_MODEL_PACKAGE (the plugin is
switched off with SGLANG_PLUGINS), checks the affine and learned checkpoints through the runner's `greedy`.
Parity is measured by the project's one harness (`fmbc_serve.parity`). Run with `pytest -s` to see the figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import requests
from support.engines import assert_parity_command_passes, require, run_engine_script

from fmbc_serve.devtools.servers import free_port, running_server
from fmbc_serve.engines.sglang.runner import completion_from_meta, cpu_server_flags
from fmbc_serve.parity import Completion, compare, reference_greedy
from fmbc_serve.tolerances import FP32_PARITY

pytestmark = pytest.mark.sglang

PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), [511, 0, 257]]
MAX_NEW_TOKENS = 16
# The CPU flags of docs/sglang.md; --max-total-tokens keeps the KV cache small (SGLang would take most of the RAM).
CPU_FLAGS = cpu_server_flags(4096)
MODEL_PACKAGE = "fmbc_serve.engines.sglang.models"
# Only SGLANG_EXTERNAL_MODEL_PACKAGE registers the model here: the entry point is filtered out by name.
ENV_VAR_REGISTRATION = {"SGLANG_EXTERNAL_MODEL_PACKAGE": MODEL_PACKAGE, "SGLANG_PLUGINS": "none"}
# The runner's greedy (the offline Engine) on each checkpoint: one `RESULT` line of completions per checkpoint.
GREEDY_SCRIPT = """
import dataclasses, json, sys
from fmbc_serve.engines.sglang.runner import greedy

if __name__ == "__main__":
    prompts, new_tokens = json.loads(sys.argv[1])
    for path in sys.argv[2:]:
        print("RESULT " + json.dumps([dataclasses.astuple(c) for c in greedy(path, prompts, new_tokens)]), flush=True)
"""


def assert_parity(mode: str, checkpoint_dir: str, results: list[Completion]) -> None:
    """Tokens equal the reference's; max |Δlogprob| within FP32_PARITY on prefill and decode (printed)."""
    rows = [compare(ref, got, len(prompt)) for ref, got, prompt in
            zip(reference_greedy(checkpoint_dir, PROMPTS, MAX_NEW_TOKENS), results, PROMPTS, strict=True)]
    for prompt, got, row in zip(PROMPTS, results, rows, strict=True):
        assert row.agree, f"{mode}: greedy tokens differ for prompt {prompt[:5]}... at step {row.first_divergence}"
        assert len(got.prompt_logprobs) == len(prompt) - 1
    prefill_delta = max(row.max_prefill_delta for row in rows)
    decode_delta = max(row.max_decode_delta for row in rows)
    print(f"\nSGLang parity [{mode}]: tokens equal; max |Δlogprob| prefill {prefill_delta:.2e}, "
          f"decode {decode_delta:.2e}")
    assert prefill_delta <= FP32_PARITY and decode_delta <= FP32_PARITY


def test_registry_scan_strict(tmp_path):
    """SGLang's own scan of our package, strict (an import error fails instead of being logged), finds the
    class; with the env var alone (entry point switched off) it is in ModelRegistry."""
    require("sglang")
    script = ("from sglang.srt.models.registry import ModelRegistry, import_model_classes\n"
              f"found = import_model_classes({MODEL_PACKAGE!r}, strict=True)\n"
              "print(sorted(found), 'FMBCForCausalLM' in ModelRegistry.models)\n")
    env = {**os.environ, **ENV_VAR_REGISTRATION}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                            env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "['FMBCForCausalLM'] True"


def test_parity_env_var_registration(tiny_checkpoints, parallel_block_checkpoints, tmp_path):
    """Affine and learned checkpoints, and the GPT-NeoX and GPT-J block styles (biases, a head bias), through the
    runner's greedy (the offline Engine), registered only by SGLANG_EXTERNAL_MODEL_PACKAGE."""
    require("sglang")
    checkpoints = {**tiny_checkpoints, **parallel_block_checkpoints}
    modes = ["affine", "learned", "parallel", "parallel_shared_norm"]
    arguments = [json.dumps([PROMPTS, MAX_NEW_TOKENS]), *(checkpoints[mode] for mode in modes)]
    results = run_engine_script(GREEDY_SCRIPT, arguments, tmp_path, count=len(modes), env=ENV_VAR_REGISTRATION,
                                timeout=400)
    for mode, completions in zip(modes, results, strict=True):
        assert_parity(mode, checkpoints[mode], [Completion(*c) for c in completions])


def test_fmbc_parity_command(tiny_checkpoints):
    """The user-facing `fmbc parity DIR --engine sglang` (entry-point registration)."""
    require("sglang")
    assert_parity_command_passes(tiny_checkpoints["binary"], "sglang")


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    """The binary checkpoint behind the exact seed command plus the CPU flags; no env var: the entry point
    registers the model and the request validation."""
    require("sglang")
    port = free_port()
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", tiny_checkpoints["binary"],
               "--host", "127.0.0.1", "--port", str(port), *CPU_FLAGS]
    log = tmp_path_factory.mktemp("sglang") / "server.log"
    with pytest.MonkeyPatch.context() as env:
        for name in ENV_VAR_REGISTRATION:
            env.delenv(name, raising=False)
        with running_server(command, port, log, health_path="/health", timeout=400) as url:
            yield url


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


def test_server_parity_binary(server, tiny_checkpoints):
    """Binary checkpoint through the real server's /generate, prompt and output logprobs included."""
    body = {"input_ids": PROMPTS, "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True}}
    response = requests.post(server + "/generate", json=body, timeout=120)
    assert response.status_code == 200, response.text
    results = [completion_from_meta(out["meta_info"]) for out in response.json()]
    assert_parity("binary", tiny_checkpoints["binary"], results)


def test_openai_completions(client, tiny_checkpoints):
    model = client.models.list().data[0].id
    assert model == tiny_checkpoints["binary"]
    greedy = {"model": model, "prompt": "Hello", "max_tokens": 8, "temperature": 0.0,
              "extra_body": {"ignore_eos": True}}
    plain = client.completions.create(**greedy)
    text = plain.choices[0].text
    assert plain.usage.completion_tokens == 8 and plain.usage.prompt_tokens == len("Hello")

    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(**greedy, stream=True)
                       if chunk.choices)
    assert streamed == text

    with_logprobs = client.completions.create(**greedy, logprobs=2).choices[0].logprobs
    assert len(with_logprobs.token_logprobs) == 8 and all(lp <= 0 for lp in with_logprobs.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in with_logprobs.top_logprobs)

    stop = next(ch for ch in text[1:] if ch.strip())
    stopped = client.completions.create(**greedy, stop=[stop]).choices[0]
    assert stopped.text == text[: text.index(stop)] and stopped.finish_reason == "stop"

    sampled = client.completions.create(model=model, prompt=[1, 2, 3], max_tokens=4, n=3, temperature=1.0)
    assert len(sampled.choices) == 3 and sorted(c.index for c in sampled.choices) == [0, 1, 2]


def test_openai_chat_uses_chat_template(client, tiny_checkpoints):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hi there"}]
    expected = AutoTokenizer.from_pretrained(tiny_checkpoints["binary"]).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=messages, max_tokens=4,
                                           temperature=0.0)
    assert reply.usage.prompt_tokens == len(expected)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 4


def curl(url: str, body: str) -> tuple[int, str]:
    """POST `body` with curl; (HTTP status, response body)."""
    result = subprocess.run(["curl", "-sS", "-X", "POST", url, "-H", "Content-Type: application/json",
                             "--data-binary", body, "-w", "\n%{http_code}"],
                            capture_output=True, text=True, timeout=120, check=True)
    text, _, status = result.stdout.rpartition("\n")
    return int(status), text


def test_curl_completion(server):
    status, text = curl(server + "/v1/completions", json.dumps({"prompt": "Hello", "max_tokens": 3}))
    assert status == 200 and len(json.loads(text)["choices"]) == 1


BAD_REQUESTS = {
    "id = V": ({"prompt": [1, 2, 512], "max_tokens": 2}, "token id 512 is out of vocabulary"),
    "id = -1": ({"prompt": [1, -1], "max_tokens": 2}, "token id -1 is out of vocabulary"),
    "id = 2**40": ({"prompt": [2**40], "max_tokens": 2}, f"token id {2**40} is out of vocabulary"),
    "bad id in a batch": ({"prompt": [[1, 2], [3, 600]], "max_tokens": 2}, "token id 600 is out of vocabulary"),
    "prompt longer than context": ({"prompt": [7] * 300, "max_tokens": 2}, "longer than the model's context length"),
    "max_tokens beyond context": ({"prompt": [1, 2], "max_tokens": 5000}, "maximum context length"),
    "huge n": ({"prompt": [1, 2], "max_tokens": 2, "n": 100000}, "n must be at most 64"),
    "huge n, streaming": ({"prompt": [1, 2], "max_tokens": 2, "n": 100000, "stream": True}, "n must be at most 64"),
    "malformed JSON": ('{"prompt": [1, 2', "JSON decode error"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_rejected_and_server_stays_healthy(server, case):
    body, message = BAD_REQUESTS[case]
    status, text = curl(server + "/v1/completions", body if isinstance(body, str) else json.dumps(body))
    assert 400 <= status < 500, (status, text)
    assert message in text, text
    status, text = curl(server + "/v1/completions", json.dumps({"prompt": [1, 2, 3], "max_tokens": 2}))
    assert status == 200, text


def test_native_generate_rejects_bad_ids(server):
    """The native /generate endpoint goes through the same validation."""
    bad = requests.post(server + "/generate", json={"input_ids": [1, 512], "sampling_params": {"max_new_tokens": 2}},
                        timeout=60)
    assert bad.status_code == 400 and "out of vocabulary" in bad.text
    huge_n = requests.post(server + "/generate", timeout=60,
                           json={"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "n": 100000}})
    assert huge_n.status_code == 400 and "FMBC_MAX_N" in huge_n.text


def test_data_parallel_2_spreads_requests_and_matches_the_reference(tiny_checkpoints, tmp_path):
    """`--dp-size 2` on CPU (one core per rank): SGLang's data-parallel controller sends requests to both
    schedulers (each logs its prefill batches as DP0 / DP1), and the answers keep the reference's greedy tokens
    and logprobs."""
    require("sglang")
    import re
    from concurrent.futures import ThreadPoolExecutor

    port = free_port()
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", tiny_checkpoints["learned"], "--host",
               "127.0.0.1", "--port", str(port), *CPU_FLAGS, "--dp-size", "2"]
    log = tmp_path / "dp.log"
    with running_server(command, port, log, env={"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}, timeout=400) as url:
        def generate(prompt: list[int]) -> Completion:
            body = {"input_ids": prompt, "return_logprob": True, "logprob_start_len": 0,
                    "sampling_params": {"temperature": 0.0, "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True}}
            reply = requests.post(url + "/generate", json=body, timeout=300)
            assert reply.status_code == 200, reply.text
            return completion_from_meta(reply.json()["meta_info"])

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(generate, PROMPTS * 4))
    batches = {rank: len(re.findall(rf" DP{rank}\] Prefill batch", log.read_text())) for rank in (0, 1)}
    print(f"\nSGLang DP=2: prefill batches per rank {batches}")
    assert batches[0] > 0 and batches[1] > 0
    for copy in range(4):
        assert_parity("learned (dp=2)", tiny_checkpoints["learned"], results[copy * 3:(copy + 1) * 3])
