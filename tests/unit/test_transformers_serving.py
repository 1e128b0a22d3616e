"""transformers' own serving paths, on both ends of the supported transformers range: continuous batching (paged
attention through the attention interface, what `transformers serve --continuous-batching` runs) answers with the
reference's greedy tokens; `transformers serve` itself cannot load a remote-code model yet (the test that fails the
day it can)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

from fmbc_serve.parity import reference_greedy

PROMPTS = [[72, 101, 108, 108, 111], list(range(1, 60)), [300, 0, 301, 5, 5, 9]]
NEW_TOKENS = 12


@pytest.mark.parametrize("name", ["binary", "parallel"])
def test_continuous_batching_gives_the_references_greedy_tokens(name: str, tiny_checkpoints: dict[str, str],
                                                                parallel_block_checkpoints: dict[str, str]) -> None:
    """`generate_batch`: the prompts scheduled together in one paged KV cache, attention by transformers' paged
    SDPA (the model's cache and attention kwargs passed as each release passes them), from the folder's code."""
    path = tiny_checkpoints["binary"] if name == "binary" else parallel_block_checkpoints["parallel"]
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    # A small paged cache: left to itself, it takes most of the machine's memory.
    paged = ContinuousBatchingConfig(block_size=32, num_blocks=32, max_batch_tokens=128)
    outputs = model.generate_batch(PROMPTS, generation_config=config, continuous_batching_config=paged, warmup=False,
                                   progress_bar=False)
    by_prompt = {tuple(output.prompt_ids): output.generated_tokens for output in outputs.values()}
    assert [by_prompt[tuple(p)] for p in PROMPTS] == [c.tokens for c in reference_greedy(path, PROMPTS, NEW_TOKENS)]


def test_transformers_serve_cannot_load_a_remote_code_model_yet(tiny_checkpoints: dict[str, str]) -> None:
    """`transformers serve --trust-remote-code` loads the class its config's `architectures` names from the
    transformers package itself (cli/serving/model_manager.py: `getattr(transformers, config.architectures[0])`),
    so a remote-code model, ours or any other, never loads there. When this fails, serve FMBC with `transformers
    serve` (with and without --continuous-batching) in a test over HTTP, against the reference."""
    from transformers.cli.serving.model_manager import ModelManager

    manager = ModelManager(device="cpu", dtype="float32", trust_remote_code=True)
    with pytest.raises(AttributeError, match="has no attribute FMBCForCausalLM"):
        manager.load_model_and_processor(ModelManager.process_model_name(tiny_checkpoints["binary"]))
