"""Throughput benchmark: the same prompts through the reference and the engines (a script, not a test).

    python scripts/benchmark.py [--layers 4] [--prompts 16] [--max-new-tokens 64] [--out DIR]
                                [--sglang-python PATH]

(a) the reference: transformers `generate` on the checkpoint loaded the way published FMBC checkpoints are
    (AutoModelForCausalLM + trust_remote_code), batched with left padding;
(b) vLLM serving the FMBC checkpoint (offline LLM engine, its default multi-process mode);
(c) vLLM serving the learned-table twin: same shape, same seed, `input_mode=learned`;
(d), (e) the same two through SGLang's offline Engine, when --sglang-python names SGLang's environment.
Each runs in its own subprocess, so peak memory (max RSS of the process and its children) is its own. Prints
generated tokens/s, the ratios b/a and b/c, and peak memory. Run it in the vLLM environment
(`bash scripts/venv.sh vllm`). All runs use float32 and greedy decoding with a fixed number of new tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_prompts(count: int, vocab_size: int) -> list[list[int]]:
    """Deterministic token-id prompts of mixed lengths (16..112 tokens)."""
    return [[(97 + 7 * i + 13 * j) % min(vocab_size, 5000) for j in range(16 + 32 * (i % 4))] for i in range(count)]


def peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def run_reference(checkpoint: str, prompts: list[list[int]], max_new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
    pad = model.config.pad_token_id
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    seconds = time.perf_counter() - start
    return {"tokens": int((out.shape[1] - width) * out.shape[0]), "seconds": seconds}


def run_vllm(checkpoint: str, prompts: list[list[int]], max_new_tokens: int) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=checkpoint, dtype="float32", seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, min_tokens=max_new_tokens, ignore_eos=True)
    token_prompts = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(token_prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(token_prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return {"tokens": sum(len(o.outputs[0].token_ids) for o in outputs), "seconds": seconds}


def run_sglang(checkpoint: str, prompts: list[list[int]], max_new_tokens: int) -> dict:
    import sglang as sgl

    from fmbc_serve.engines.sglang.runner import engine_args

    engine = sgl.Engine(**engine_args(checkpoint, kv_tokens=len(prompts) * (max(map(len, prompts)) + max_new_tokens)))
    try:
        params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}
        engine.generate(input_ids=prompts[:2], sampling_params={"max_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        outputs = engine.generate(input_ids=prompts, sampling_params=params)
        seconds = time.perf_counter() - start
    finally:
        engine.shutdown()
    return {"tokens": sum(o["meta_info"]["completion_tokens"] for o in outputs), "seconds": seconds}


RUNNERS = {"reference": run_reference, "vllm": run_vllm, "sglang": run_sglang}


def child(args: argparse.Namespace) -> None:
    prompts = make_prompts(args.prompts, args.vocab_size)
    result = RUNNERS[args.run](args.checkpoint, prompts, args.max_new_tokens)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result), flush=True)


def spawn(run: str, checkpoint: str, args: argparse.Namespace, vocab_size: int, python: str = sys.executable) -> dict:
    command = [python, __file__, "--run", run, "--checkpoint", checkpoint, "--prompts", str(args.prompts),
               "--max-new-tokens", str(args.max_new_tokens), "--vocab-size", str(vocab_size)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{run} on {checkpoint} failed:\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper", help="shape to benchmark (default: the paper's)")
    parser.add_argument("--layers", type=int, default=4, help="override the preset's depth (CPU time)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", help="folder for the two checkpoints (default: a temporary one)")
    parser.add_argument("--sglang-python", help="python of an environment with SGLang: adds runs (d) and (e)")
    parser.add_argument("--run", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        child(args)
        return

    from fmbc_serve.checkpoint import init_checkpoint, make_config

    root = Path(args.out or tempfile.mkdtemp(prefix="fmbc-bench-"))
    dirs = {}
    for mode in ("binary", "learned"):
        config = make_config(args.preset, input_mode=mode, num_hidden_layers=args.layers)
        dirs[mode] = str(init_checkpoint(config, root / mode, seed=0))
    vocab = config.vocab_size
    print(f"shape: preset {args.preset}, {args.layers} layers, d={config.hidden_size}, V={vocab}; "
          f"{args.prompts} prompts x {args.max_new_tokens} new tokens, float32, greedy, {os.cpu_count()} CPUs")
    results = {
        "(a) reference generate, FMBC": spawn("reference", dirs["binary"], args, vocab),
        "(b) vLLM, FMBC": spawn("vllm", dirs["binary"], args, vocab),
        "(c) vLLM, learned-table twin": spawn("vllm", dirs["learned"], args, vocab),
    }
    if args.sglang_python:
        results["(d) SGLang, FMBC"] = spawn("sglang", dirs["binary"], args, vocab, args.sglang_python)
        results["(e) SGLang, learned-table twin"] = spawn("sglang", dirs["learned"], args, vocab, args.sglang_python)
    print(f"{'run':<32} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'peak RSS MiB':>13}")
    rates = {}
    for name, r in results.items():
        rates[name[:3]] = r["tokens"] / r["seconds"]
        print(f"{name:<32} {r['tokens']:>7} {r['seconds']:>8.2f} {rates[name[:3]]:>9.1f} {r['peak_rss_mib']:>13.0f}")
    print(f"b/a (vLLM vs reference):        {rates['(b)'] / rates['(a)']:.2f}x")
    print(f"b/c (vLLM, FMBC vs learned):    {rates['(b)'] / rates['(c)']:.2f}x")
    if args.sglang_python:
        print(f"d/a (SGLang vs reference):      {rates['(d)'] / rates['(a)']:.2f}x")
        print(f"d/e (SGLang, FMBC vs learned):  {rates['(d)'] / rates['(e)']:.2f}x")


if __name__ == "__main__":
    main()
