"""Foreign checkpoints in the parallel block styles, served by each engine's OpenAI server: the greedy text and
its logprobs over HTTP equal the foreign original's, run with its own code.

vLLM serves a Pythia-style checkpoint (parallel residual, its context under a key of its own, bfloat16 weights in a
`pytorch_model.bin`) as users would: `fmbc serve SRC --trust-remote-code`, which imports it once into a cache and
reuses the import on the next start; it answers the model card's request. SGLang serves a GPT-J-style one (one
shared norm, a head with a bias, float16 shards) imported with `fmbc import` and its stock server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch
from support.engines import require

from fmbc_serve.devtools.foreign import write_foreign
from fmbc_serve.devtools.servers import free_port, running_server
from fmbc_serve.engines import runner
from fmbc_serve.importer.source import logits_of
from fmbc_serve.tolerances import FP32_PARITY

PROMPTS = [[5, 17, 200, 3, 99], [42], list(range(1, 40))]
MAX_TOKENS = 8
SERVED_NAME = "fmbc"
FMBC = str(Path(sys.executable).parent / "fmbc")
# The model card's request, as in tests/engines/test_examples.py.
MODEL_CARD_REQUEST = {"model": SERVED_NAME, "prompt": "Once upon a time,", "max_tokens": 512, "temperature": 0.5}


def foreign_greedy(src: str, prompt: list[int], steps: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and their logprobs from the foreign model, by its own code, in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=True, dtype=torch.float32).eval()
    ids, logprobs = torch.tensor([prompt]), []
    for _ in range(steps):
        with torch.no_grad():
            step = logits_of(model, ids)[0, -1].log_softmax(-1)
        token = int(step.argmax())
        logprobs.append(float(step[token]))
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return ids[0, len(prompt):].tolist(), logprobs


def assert_serves_the_foreign_model(base_url: str, src: str, label: str) -> None:
    from openai import OpenAI
    from transformers import AutoTokenizer

    client, tokenizer = OpenAI(base_url=base_url + "/v1", api_key="unused"), AutoTokenizer.from_pretrained(src)
    for prompt in PROMPTS:
        tokens, logprobs = foreign_greedy(src, prompt, MAX_TOKENS)
        reply = client.completions.create(model=SERVED_NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                          logprobs=1, extra_body={"ignore_eos": True})
        choice = reply.choices[0]
        worst = max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs, logprobs, strict=True))
        print(f"\n{label}: prompt of {len(prompt)}, text equal {choice.text == tokenizer.decode(tokens)}, "
              f"max |Δlogprob| {worst:.2e}")
        assert choice.text == tokenizer.decode(tokens)
        assert worst <= FP32_PARITY


@pytest.mark.vllm
def test_fmbc_serve_imports_a_foreign_checkpoint_once_and_serves_it(tmp_path: Path) -> None:
    require("vllm")
    # vLLM's CPU attention takes head sizes 32, 64, ...: 4 heads of 32; a context long enough for the card's request
    src = write_foreign("pythia", tmp_path / "pythia", seed=5, weights="bin", dtype=torch.bfloat16, hidden_size=128,
                        max_sequence_window=1024)
    env = {"FMBC_IMPORT_CACHE": str(tmp_path / "cache")}
    command = [FMBC, "serve", src, "--trust-remote-code", "--engine", "vllm", "--dtype", "float32"]
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    port = free_port()
    with running_server([*command, "--port", str(port)], port, first_log, env=env) as base_url:
        assert_serves_the_foreign_model(base_url, src, "vLLM serving an imported Pythia-style checkpoint")
        reply = requests.post(base_url + "/v1/completions", json=MODEL_CARD_REQUEST, timeout=600)
        assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
        whole = requests.post(base_url + "/v1/completions", json={**MODEL_CARD_REQUEST, "ignore_eos": True},
                              timeout=600)  # a random model may end early: the context holds all 512 tokens
        assert whole.status_code == 200 and whole.json()["usage"]["completion_tokens"] == 512, whole.text
    (imported,) = [entry for entry in (tmp_path / "cache").iterdir() if entry.is_dir()]  # beside it: its lock
    assert "importing it into" in first_log.read_text() and "Converted from" in (imported / "README.md").read_text()
    port = free_port()
    with running_server([*command, "--port", str(port)], port, second_log, env=env) as base_url:
        assert_serves_the_foreign_model(base_url, src, "the same, second start")
    assert f"reusing {imported}" in second_log.read_text() and "proof" not in second_log.read_text()


@pytest.mark.sglang
def test_sglang_serves_an_imported_gptj_style_checkpoint(tmp_path: Path) -> None:
    require("sglang")
    src = write_foreign("gptj", tmp_path / "gptj", seed=5, weights="sharded", dtype=torch.float16)
    out = tmp_path / "gptj-fmbc"
    result = subprocess.run([FMBC, "import", src, "--out", str(out), "--trust-remote-code", "--dtype", "float32"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    port = free_port()
    command, env = runner("sglang").server_command(str(out), "127.0.0.1", port, SERVED_NAME, cuda=False)
    with running_server(command, port, tmp_path / "server.log", env=env) as base_url:
        assert_serves_the_foreign_model(base_url, src, "SGLang serving an imported GPT-J-style checkpoint")
