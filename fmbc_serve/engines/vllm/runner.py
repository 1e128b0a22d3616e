"""vLLM runner: offline greedy decoding for parity checks (`fmbc parity --engine vllm`) and the OpenAI server
command for `fmbc serve`, with the settings a CPU-only machine needs (vLLM's CPU build otherwise reserves
most of the RAM for its KV cache). Call `greedy` from a script under an `if __name__ == "__main__":` guard."""

from __future__ import annotations

import gc
import os
import socket
import sys
from collections.abc import Sequence

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


def server_command(model: str, host: str, port: int, served_name: str, cuda: bool, python: str = sys.executable,
                   engine_args: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """`vllm serve MODEL ...` (through `fmbc_serve.engines.vllm.cli`, which runs vLLM's own CLI on the CPU build
    too) followed by ENGINE_ARGS, and the environment it needs here: the CPU build's KV-cache size and, across
    hosts, the network settings of `multi_host_env`."""
    command = [python, "-m", "fmbc_serve.engines.vllm.cli", "serve", model,
               "--served-model-name", served_name, "--host", host, "--port", str(port), *engine_args]
    env = {} if cuda else {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)}
    return command, env | multi_host_env(engine_args)


def flag_value(engine_args: Sequence[str], flag: str) -> str | None:
    """The value of a `--flag V` / `--flag=V` in ENGINE_ARGS (vLLM also spells flags with underscores)."""
    spellings = {flag, flag.replace("-", "_").replace("__", "--", 1)}
    for i, arg in enumerate(engine_args):
        name, equals, value = arg.partition("=")
        if name in spellings:
            return value if equals else (engine_args[i + 1] if i + 1 < len(engine_args) else None)
    return None


def multi_host_env(engine_args: Sequence[str]) -> dict[str, str]:
    """Where the engine spans hosts (`--master-addr`, or `--data-parallel-address`), the address and interface
    this host reaches the head by, as VLLM_HOST_IP and GLOO_SOCKET_IFNAME (vLLM's CPU collectives run on gloo).
    Unset, gloo announces the address its hostname resolves to, often 127.0.0.1, and the other host's connect is
    refused. Either variable set in the environment is kept."""
    head = flag_value(engine_args, "--master-addr") or flag_value(engine_args, "--data-parallel-address")
    if head is None or ({"VLLM_HOST_IP", "GLOO_SOCKET_IFNAME"} <= os.environ.keys()):
        return {}
    import psutil

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((head, 9))  # a UDP connect sends nothing: it only picks the route
        local = probe.getsockname()[0]
    interface = next(name for name, addresses in psutil.net_if_addrs().items()
                     if any(address.address == local for address in addresses))
    derived = {"VLLM_HOST_IP": local, "GLOO_SOCKET_IFNAME": interface}
    return {name: value for name, value in derived.items() if name not in os.environ}
