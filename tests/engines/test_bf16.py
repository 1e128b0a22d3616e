"""bfloat16, what a GPU user gets by default (`--dtype auto` on a bf16 checkpoint), on both engines: a bf16-stored
tiny checkpoint and the embedded default model, decoded greedily by each engine in bf16 and judged by the
reference in bf16 and in fp32 on the engine's own tokens (`fmbc_serve.parity.compare_close`).

Exact token equality is not owed in bf16 (rounding may flip a near-tie), so each engine token must be one the
reference considers within BF16_TIE of its best at that step, and its logprob within BF16_LOGPROB of the
reference's (fmbc_serve/tolerances.py says why these sizes).
"""

from __future__ import annotations

import json

import pytest
import torch
from support.engines import require, run_engine_script

from fmbc_serve.parity import Completion, compare_close
from fmbc_serve.serve import DEFAULT_MODEL
from fmbc_serve.tolerances import BF16_LOGPROB, BF16_TIE

ENGINES = [pytest.param("vllm", marks=pytest.mark.vllm), pytest.param("sglang", marks=pytest.mark.sglang)]
NEW_TOKENS = 24
# One bf16 run of each checkpoint per engine process; prints one `RESULT` line of completions per checkpoint.
BF16_GREEDY_SCRIPT = """
import json, sys
from fmbc_serve.engines import runner

if __name__ == "__main__":
    engine, new_tokens, jobs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    for path, prompts in jobs:
        completions = runner(engine).greedy(path, prompts, new_tokens, dtype="bfloat16")
        print("RESULT " + json.dumps([[c.tokens, c.token_logprobs, c.prompt_logprobs] for c in completions]),
              flush=True)
"""


def default_model_prompts() -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    texts = ["And God said,", "In the beginning God created", "Question: Who is the king?\nAnswer:",
             "And it came to pass, when the men of the city"]
    return [tokenizer(text).input_ids for text in texts]


@pytest.fixture(scope="module", params=ENGINES)
def bf16_runs(request, tmp_path_factory) -> tuple[str, dict[str, tuple[str, list[list[int]], list[Completion]]]]:
    """(engine, {name: (checkpoint, prompts, the engine's bf16 completions)}) for a bf16-stored tiny checkpoint
    and the embedded default model, from one engine process."""
    from fmbc_serve.checkpoint import init_checkpoint, make_config

    engine = request.param
    require(engine)
    root = tmp_path_factory.mktemp(f"bf16-{engine}")
    tiny = str(init_checkpoint(make_config("tiny"), root / "tiny-bf16", seed=4, dtype=torch.bfloat16))
    jobs = {"tiny stored in bf16": (tiny, [[72, 101, 108, 108, 111], list(range(1, 90)), [300, 0, 511, 7]]),
            "embedded default model": (str(DEFAULT_MODEL), default_model_prompts())}
    results = run_engine_script(BF16_GREEDY_SCRIPT, [engine, str(NEW_TOKENS), json.dumps(list(jobs.values()))], root,
                                count=len(jobs), timeout=900)
    return engine, {name: (path, prompts, [Completion(*c) for c in completions])
                    for (name, (path, prompts)), completions in zip(jobs.items(), results, strict=True)}


@pytest.mark.parametrize("reference_dtype", [torch.bfloat16, torch.float32], ids=["reference-bf16", "reference-fp32"])
@pytest.mark.parametrize("name", ["tiny stored in bf16", "embedded default model"])
def test_bf16_serving_stays_within_rounding_of_the_reference(bf16_runs, name: str,
                                                             reference_dtype: torch.dtype) -> None:
    engine, runs = bf16_runs
    checkpoint, prompts, completions = runs[name]
    rows = compare_close(checkpoint, prompts, completions, reference_dtype)
    agreed, steps = sum(r.reference_argmax for r in rows), sum(r.steps for r in rows)
    tie_gap, delta = max(r.max_tie_gap for r in rows), max(r.max_logprob_delta for r in rows)
    print(f"\n{engine} bf16, {name}, reference {reference_dtype}: reference's own top token at {agreed}/{steps} "
          f"steps, max tie gap {tie_gap:.3f}, max |Δlogprob| {delta:.3f}")
    assert tie_gap <= BF16_TIE and delta <= BF16_LOGPROB
