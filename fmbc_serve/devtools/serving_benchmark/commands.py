"""Each engine's OpenAI server command for one benchmarked model."""

from __future__ import annotations

import torch

from ...engines import runner


def server_command(engine: str, python: str, checkpoint: str, port: int, context: int, tensor_parallel: int,
                   servers_at_once: int, transformers_backend: bool = False) -> tuple[list[str], dict[str, str]]:
    """The engine's OpenAI server command for one model (as `fmbc serve` starts it), with what this benchmark
    needs: float32 and the shape's context on CPU, a share of the GPU each when several servers run at once,
    tensor parallelism with one core per rank on CPU. With `transformers_backend`, the engine's stock server on its
    Transformers backend instead, our plugin filtered out: the checkpoint folder's own code."""
    cuda = torch.cuda.is_available()
    command, env = runner(engine).server_command(checkpoint, "127.0.0.1", port, "fmbc", cuda, python=python)
    if transformers_backend:
        if engine == "vllm":  # vLLM's own server module in place of our launcher (`vllm serve MODEL`)
            command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, *command[5:]]
        command += ["--model-impl", "transformers", "--trust-remote-code"]
        env |= {"VLLM_PLUGINS": "none", "SGLANG_PLUGINS": "none"}
    if engine == "vllm":
        if not cuda:
            command += ["--dtype", "float32", "--max-model-len", str(context)]
        elif servers_at_once > 1:
            command += ["--gpu-memory-utilization", f"{0.85 / servers_at_once:.2f}"]
        if tensor_parallel > 1:
            command += ["--tensor-parallel-size", str(tensor_parallel), "--distributed-executor-backend", "mp"]
    else:
        # Idle, SGLang's scheduler polls its sockets in a busy loop: a server waiting for its turn would take a
        # core from the one being measured. With this flag it waits in zmq's poll instead.
        command += ["--sleep-on-idle"]
        if cuda and servers_at_once > 1:
            command += ["--mem-fraction-static", f"{0.85 / servers_at_once:.2f}"]
        if tensor_parallel > 1:
            command += ["--tp-size", str(tensor_parallel)]
    if tensor_parallel > 1 and not cuda:
        bind = "VLLM_CPU_OMP_THREADS_BIND" if engine == "vllm" else "SGLANG_CPU_OMP_THREADS_BIND"
        env[bind] = "|".join(str(core) for core in range(tensor_parallel))
    return command, env
