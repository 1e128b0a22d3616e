"""vLLM runner: offline greedy decoding for parity checks (`fmbc parity --engine vllm`) and the OpenAI server
command for `fmbc serve`, with the settings a CPU-only machine needs (vLLM's CPU build otherwise reserves
most of the RAM for its KV cache). Call `greedy` from a script under an `if __name__ == "__main__":` guard."""

from __future__ import annotations

import gc
import os
import sys

from fmbc_serve.parity import Completion

# GiB of KV cache on the CPU build (its default takes most of the machine's memory).
CPU_KVCACHE_GIB = "1"


def greedy(checkpoint: str, prompts: list[list[int]], max_new_tokens: int, **engine_args) -> list[Completion]:
    """Greedy decoding through vLLM's offline `LLM` in float32 (single process, eager, unless overridden)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    from vllm import LLM, SamplingParams
    from vllm.distributed import cleanup_dist_env_and_memory
    from vllm.inputs import TokensPrompt

    args = dict(model=checkpoint, dtype="float32", enforce_eager=True, distributed_executor_backend="uni",
                seed=0, max_num_seqs=8)
    args.update(engine_args)
    llm = LLM(**args)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, min_tokens=max_new_tokens,
                                ignore_eos=True, logprobs=0, prompt_logprobs=0)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        results = []
        for out in outputs:
            sample = out.outputs[0]
            token_logprobs = [step[token].logprob for step, token in zip(sample.logprobs, sample.token_ids,
                                                                            strict=True)]
            prompt_logprobs = [step[token].logprob
                               for step, token in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:], strict=True)]
            results.append(Completion(list(sample.token_ids), token_logprobs, prompt_logprobs))
        return results
    finally:
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def server_command(model: str, host: str, port: int, served_name: str, cuda: bool,
                   python: str = sys.executable) -> tuple[list[str], dict[str, str]]:
    """vLLM's own OpenAI server command and the environment it needs here."""
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", served_name, "--host", host, "--port", str(port)]
    env = {} if cuda else {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)}
    return command, env
