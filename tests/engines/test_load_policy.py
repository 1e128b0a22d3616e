"""The one load policy in both engines: every bad checkpoint of the shared table (tests/support/bad_checkpoints.py)
is refused by each engine's own loader, before anything is served, with the same words; the accepted departures
load and compute the reference's model.

Each engine loads the whole table in one process: vLLM through its offline `LLM` (its model loader and our
class, in-process), SGLang through its `get_model` (its ModelConfig, weight iterator and the registry our plugin
fills, as its scheduler calls them). `fmbc serve` refusing a bad checkpoint at start is shown once per engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support.bad_checkpoints import ACCEPTED, REFUSED, write_variant
from support.engines import require, run_engine_script

from fmbc_serve.devtools.servers import free_port
from fmbc_serve.parity import Completion, compare, reference_greedy
from fmbc_serve.tolerances import FP32_PARITY

ENGINES = [pytest.param("vllm", marks=pytest.mark.vllm), pytest.param("sglang", marks=pytest.mark.sglang)]
PROMPTS = [[1, 2, 3, 4, 5], [300, 0, 511, 7]]
NEW_TOKENS = 6

# Each script prints one `RESULT {json}` line per checkpoint: {"error": text} or the engine's answer.
LOADERS = {
    "vllm": """
import json, sys, traceback
from fmbc_serve.engines.vllm.runner import greedy

if __name__ == "__main__":
    prompts, new_tokens = json.loads(sys.argv[1])
    for path in sys.argv[2:]:
        try:
            result = {"completions": [[c.tokens, c.token_logprobs, c.prompt_logprobs]
                                      for c in greedy(path, prompts, new_tokens)]}
        except Exception as err:
            result = {"error": "".join(traceback.format_exception(err))}
        print("RESULT " + json.dumps(result), flush=True)
""",
    "sglang": """
import json, os, sys, traceback
from sglang.srt.configs.device_config import DeviceConfig
from sglang.srt.configs.load_config import LoadConfig
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
from sglang.srt.model_loader import get_model
from sglang.srt.plugins import load_plugins
from sglang.srt.runtime_context import SpawnRanks, publish
from sglang.srt.server_args import ServerArgs
from fmbc_serve.engines.sglang.runner import engine_args
from fmbc_serve.weights import checkpoint_name
from safetensors.torch import load_file
import torch

if __name__ == "__main__":
    port = int(sys.argv[1])
    load_plugins()  # as SGLang's scheduler process does: our entry point registers the class
    publish(ServerArgs(**engine_args(sys.argv[2], 64)), role="scheduler",
            ranks=SpawnRanks(world_rank=0, dp_rank=None, gpu_id=0))
    init_distributed_environment(backend="gloo", world_size=1, rank=0, local_rank=0,
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel()
    for path in sys.argv[2:]:
        try:
            model = get_model(model_config=ModelConfig.from_server_args(ServerArgs(**engine_args(path, 64))),
                              load_config=LoadConfig(), device_config=DeviceConfig("cpu"))
            stored = load_file(os.path.join(path, "model.safetensors"))
            shards = ("q", "k", "v")
            result = {"loaded_as_stored": all(
                torch.equal(param, torch.cat([stored[checkpoint_name(name, shard)] for shard in shards]).float()
                            if ".qkv_proj." in name else stored[name].float())
                for name, param in model.named_parameters())}
        except Exception as err:
            result = {"error": "".join(traceback.format_exception(err))}
        print("RESULT " + json.dumps(result), flush=True)
""",
}


@pytest.fixture(scope="module", params=ENGINES)
def outcomes(request, tiny_checkpoints, tmp_path_factory) -> tuple[str, dict[str, dict], dict[str, str]]:
    """(engine, case -> what the engine's loader did, case -> checkpoint), for the whole table in one engine
    process."""
    engine = request.param
    require(engine)
    root = tmp_path_factory.mktemp(f"load-policy-{engine}")
    cases = {**{case: change for case, (change, _) in REFUSED.items()}, **ACCEPTED}
    paths = [write_variant(tiny_checkpoints["binary"], root / f"case{i}", change)
             for i, change in enumerate(cases.values())]
    # vLLM's loader takes the prompts; SGLang's, the port its one-process distributed group listens on.
    loader_arg = json.dumps([PROMPTS, NEW_TOKENS]) if engine == "vllm" else str(free_port())
    results = run_engine_script(LOADERS[engine], [loader_arg, *paths], root, count=len(paths), timeout=1200)
    return engine, dict(zip(cases, results, strict=True)), dict(zip(cases, paths, strict=True))


@pytest.mark.parametrize("case", list(REFUSED))
def test_the_engine_refuses_the_bad_checkpoint_with_the_policys_words(outcomes, case: str) -> None:
    engine, results, _ = outcomes
    _, message = REFUSED[case]
    assert "error" in results[case], f"{engine} loaded the bad checkpoint '{case}'"
    assert "CheckpointError: FMBC checkpoint does not match its config" in results[case]["error"]
    assert message in results[case]["error"], results[case]["error"][-3000:]


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_the_engine_loads_the_accepted_departure_exactly(outcomes, case: str) -> None:
    engine, results, paths = outcomes
    assert "error" not in results[case], results[case]["error"][-3000:]
    if engine == "sglang":
        assert results[case]["loaded_as_stored"]
        return
    reference = reference_greedy(paths[case], PROMPTS, NEW_TOKENS)
    got = [Completion(*completion) for completion in results[case]["completions"]]
    rows = [compare(r, g, len(p)) for r, g, p in zip(reference, got, PROMPTS, strict=True)]
    assert all(row.agree for row in rows) and max(row.max_delta for row in rows) <= FP32_PARITY


@pytest.mark.parametrize("engine", ENGINES)
def test_fmbc_serve_refuses_a_bad_checkpoint_before_serving(engine: str, tiny_checkpoints, tmp_path: Path) -> None:
    """As users start it: the engine's server exits at start with the policy's message, nothing listening."""
    require(engine)
    change, message = REFUSED["stray weight_scale, no quantization_config"]
    bad = write_variant(tiny_checkpoints["binary"], tmp_path / "bad", change)
    fmbc = str(Path(sys.executable).parent / "fmbc")
    run = subprocess.run([fmbc, "serve", bad, "--engine", engine, "--port", str(free_port())], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode != 0
    assert message in run.stdout + run.stderr, (run.stdout + run.stderr)[-3000:]
    assert "is ready" not in run.stdout
