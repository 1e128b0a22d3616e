"""`/v1/embeddings` for an FMBC checkpoint, asked with the OpenAI SDK: vLLM's pooling runner (`--runner pooling
--convert embed`) and SGLang's `--is-embedding` both pool the final norm's hidden state at the last token and
L2-normalise it; the vectors must equal the reference's (`fmbc_serve.parity.reference_embeddings`)."""

from __future__ import annotations

import sys

import pytest
import torch
from support.engines import require
from support.servers import ENGINE_ENV

from fmbc_serve.devtools.servers import free_port, running_server
from fmbc_serve.parity import reference_embeddings
from fmbc_serve.tolerances import FP32_PARITY

PROMPTS = [[72, 101, 108, 108, 111], list(range(1, 60)), [7], [300, 301, 302, 5, 5, 5, 9, 100]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from fmbc_serve.checkpoint import init_checkpoint, make_config

    return str(init_checkpoint(make_config("tiny-affine"), tmp_path_factory.mktemp("embed") / "fmbc", seed=3))


def assert_embeddings_match(label: str, base_url: str, model: str, checkpoint: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="unused")
    out = client.embeddings.create(model=model, input=PROMPTS)
    served = torch.tensor([row.embedding for row in out.data])
    expected = reference_embeddings(checkpoint, PROMPTS)
    delta = (served - expected).abs().max().item()
    print(f"\n{label} embeddings: {tuple(served.shape)}, max |Δ| {delta:.3e}, norms {served.norm(dim=-1).tolist()}")
    assert served.shape == expected.shape
    assert delta <= FP32_PARITY
    assert out.usage.prompt_tokens == sum(len(p) for p in PROMPTS)


@pytest.mark.vllm
def test_vllm_pooling_runner_embeddings_equal_the_reference(checkpoint, tmp_path) -> None:
    require("vllm")
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint, "--port", str(port),
               "--host", "127.0.0.1", "--dtype", "float32", "--runner", "pooling", "--convert", "embed"]
    with running_server(command, port, tmp_path / "server.log", env=ENGINE_ENV) as base_url:
        assert_embeddings_match("vLLM", base_url, checkpoint, checkpoint)


@pytest.mark.sglang
def test_sglang_is_embedding_equals_the_reference(checkpoint, tmp_path) -> None:
    require("sglang")
    from fmbc_serve.engines.sglang.runner import server_command

    port = free_port()
    command, env = server_command(checkpoint, "127.0.0.1", port, "fmbc-embed", cuda=False)
    with running_server(command + ["--is-embedding"], port, tmp_path / "server.log", env=env) as base_url:
        assert_embeddings_match("SGLang", base_url, "fmbc-embed", checkpoint)
