"""The reference model: zero input parameters, KV-cache generation, batching, and loading without fmbc_serve."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from fmbc_serve import FMBCForCausalLM, versions
from fmbc_serve.checkpoint import make_config
from fmbc_serve.configuration_fmbc import TRANSFORMERS_TESTED, check_transformers
from fmbc_serve.modeling_fmbc import CACHE_FIELD, embed_input
from fmbc_serve.serve import DEFAULT_MODEL

PROMPTS = [[72, 101, 108, 108, 111], [84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116], [7]]


def load(path: str) -> FMBCForCausalLM:
    return FMBCForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def greedy_without_cache(model: FMBCForCausalLM, ids: list[int], steps: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            x = torch.cat([x, model(x, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids):].tolist()


@pytest.mark.parametrize("mode", ["binary", "affine", "learned", "parallel", "parallel_shared_norm"])
def test_kv_cache_generation_equals_full_reforward(tiny_checkpoints: dict[str, str],
                                                  parallel_block_checkpoints: dict[str, str], mode: str) -> None:
    model = load({**tiny_checkpoints, **parallel_block_checkpoints}[mode])
    for ids in PROMPTS:
        with torch.no_grad():
            cached = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
        assert cached[0, len(ids):].tolist() == greedy_without_cache(model, ids, 24)


@pytest.mark.parametrize("mode", ["binary", "learned"])
def test_left_padded_batch_matches_single_prompts(tiny_checkpoints: dict[str, str], mode: str) -> None:
    model = load(tiny_checkpoints[mode])
    pad = model.config.pad_token_id
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=pad)
        for row, prompt in enumerate(PROMPTS):
            single = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
            assert batch[row, width:].tolist() == single[0, len(prompt):].tolist()


def test_fixed_modes_have_no_input_parameters() -> None:
    fixed = FMBCForCausalLM(make_config("tiny"))
    learned = FMBCForCausalLM(make_config("tiny-learned"))
    assert sum(p.numel() for p in fixed.model.embed_tokens.parameters()) == 0
    assert sum(p.numel() for p in fixed.parameters()) + 512 * 128 == sum(p.numel() for p in learned.parameters())
    assert not any("embed_tokens" in name for name in fixed.state_dict())


def test_input_is_the_binary_code(tiny_checkpoints: dict[str, str]) -> None:
    model = load(tiny_checkpoints["affine"])
    ids = torch.arange(512)
    assert torch.equal(embed_input(model.model.embed_tokens, ids, torch.float32), model.config.binary_code().embed(ids))


@pytest.mark.parametrize("mode", ["binary", "learned"])
@pytest.mark.parametrize("bad", [512, -1])
def test_out_of_range_ids_raise(tiny_checkpoints: dict[str, str], mode: str, bad: int) -> None:
    model = load(tiny_checkpoints[mode])
    with pytest.raises(ValueError, match="512"):
        model(torch.tensor([[1, bad]]))


def test_over_long_input_raises(tiny_checkpoints: dict[str, str]) -> None:
    model = load(tiny_checkpoints["binary"])
    with pytest.raises(ValueError, match="exceeds the context length"):
        model(torch.zeros(1, 257, dtype=torch.long))


def test_loads_through_installed_package_without_remote_code(tiny_checkpoints: dict[str, str]) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["binary"])
    assert type(model) is FMBCForCausalLM


REMOTE_CODE_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    class BlockFmbcServe(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "fmbc_serve" or name.startswith("fmbc_serve."):
                raise ImportError("fmbc_serve is blocked in this interpreter")

    sys.meta_path.insert(0, BlockFmbcServe())
    try:
        import fmbc_serve  # noqa: F401
        raise SystemExit("fmbc_serve should not be importable here")
    except ImportError:
        pass

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = sys.argv[1]
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32).eval()
    ids = tokenizer("Hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]
    print(json.dumps({"module": type(model).__module__, "vocab": len(tokenizer), "ids": ids[0].tolist(),
                      "logits": logits.tolist()}))
""")


@pytest.mark.parametrize("mode", ["binary", "affine", "learned", "default model"])
def test_folder_loads_with_remote_code_where_fmbc_serve_is_absent(tiny_checkpoints: dict[str, str],
                                                                 mode: str, tmp_path) -> None:
    """Every folder we write, the embedded default model's too, loads with transformers alone."""
    path = str(DEFAULT_MODEL) if mode == "default model" else tiny_checkpoints[mode]
    result = subprocess.run([sys.executable, "-c", REMOTE_CODE_SCRIPT, path], capture_output=True, text=True,
                            cwd=tmp_path, stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["module"].startswith("transformers_modules.")
    assert remote["vocab"] == load(path).config.vocab_size
    with torch.no_grad():
        local = load(path)(torch.tensor([remote["ids"]])).logits[0]
    assert torch.equal(torch.tensor(remote["logits"]), local)


def test_parity_reference_keeps_prompt_tokens_equal_to_the_pad_id(tiny_checkpoints: dict[str, str]) -> None:
    """The parity harness's reference must not mask a prompt token that happens to equal its pad id (0)."""
    from fmbc_serve.parity import reference_greedy

    prompt = [511, 0, 257, 0]
    (result,) = reference_greedy(tiny_checkpoints["learned"], [prompt], 6)
    assert result.tokens == greedy_without_cache(load(tiny_checkpoints["learned"]), prompt, 6)
    assert len(result.prompt_logprobs) == len(prompt) - 1 and len(result.token_logprobs) == 6


@pytest.mark.parametrize("style", ["sequential", "parallel", "parallel_shared_norm"])
def test_each_block_style_computes_its_formula(parallel_block_checkpoints: dict[str, str], style: str) -> None:
    """The reference's blocks, written out: x + attn(ln1(x)) then + mlp(ln2(.)) (sequential), x + attn(ln1(x)) +
    mlp(ln2(x)) (GPT-NeoX's parallel residual), x + attn(ln(x)) + mlp(ln(x)) (GPT-J's one shared norm); then the
    final norm and the head with its bias."""
    if style == "sequential":
        model = FMBCForCausalLM(make_config("tiny", lm_head_bias=True)).eval()
    else:
        model = load(parallel_block_checkpoints[style])
    ids = torch.tensor([[5, 300, 7, 7, 511, 2]])
    rotary = model.model.rotary_emb(torch.arange(ids.shape[1]).unsqueeze(0))
    with torch.no_grad():
        x = model.config.binary_code().embed(ids)
        for layer in model.model.layers:
            attn = layer.self_attn(layer.input_layernorm(x), rotary, None, None)  # no mask: causal
            if style == "sequential":
                x = x + attn
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            else:
                second = layer.input_layernorm if style == "parallel_shared_norm" else layer.post_attention_layernorm
                x = x + attn + layer.mlp(second(x))
        expected = model.lm_head(model.model.norm(x))
        torch.testing.assert_close(model(ids, use_cache=False).logits, expected, atol=1e-5, rtol=1e-5)
    assert (model.lm_head.bias is not None) == (style != "parallel")
    assert all(hasattr(layer, "post_attention_layernorm") == (style != "parallel_shared_norm")
               for layer in model.model.layers)


def test_cache_is_taken_under_this_releases_name(tiny_checkpoints: dict[str, str]) -> None:
    """transformers 5.24 passes the KV cache as `cache` (and still takes `past_key_values`), older releases as
    `past_key_values` (their `cache` is continuous batching's, for the attention function): a cache handed over
    under such a name is used (continuing from it equals a full forward), and both at once is refused."""
    model = load(tiny_checkpoints["binary"])
    ids = torch.tensor([PROMPTS[1]])
    names = ("cache", "past_key_values") if CACHE_FIELD == "cache" else ("past_key_values",)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[0, -1]
        for name in names:
            prefix = model(ids[:, :-1], use_cache=True)
            step = model(ids[:, -1:], use_cache=True, **{name: getattr(prefix, CACHE_FIELD)})
            torch.testing.assert_close(step.logits[0, -1], full, rtol=1e-5, atol=1e-5)
        if CACHE_FIELD == "cache":
            cache = model(ids[:, :-1], use_cache=True)[CACHE_FIELD]
            with pytest.raises(ValueError, match="not both"):
                model(ids[:, -1:], cache=cache, past_key_values=cache)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_each_attention_implementation_gives_the_same_answers(tiny_checkpoints: dict[str, str],
                                                              parallel_block_checkpoints: dict[str, str],
                                                              implementation: str) -> None:
    """transformers' attention interface: eager and sdpa agree on logits and on left-padded batched generation,
    for the sequential and the parallel block."""
    for path in (tiny_checkpoints["binary"], parallel_block_checkpoints["parallel"]):
        model = FMBCForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=implementation).eval()
        reference = load(path)
        assert model.config._attn_implementation == implementation
        ids = torch.tensor([PROMPTS[1]])
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        batch = torch.tensor([[0] * 6 + PROMPTS[0], PROMPTS[1]])
        mask = torch.tensor([[0] * 6 + [1] * 5, [1] * 11])
        out = model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        for row, prompt in zip(out, PROMPTS[:2], strict=True):
            assert row[-5:].tolist() == greedy_without_cache(reference, prompt, 5)


def test_attention_kwargs_reach_a_registered_attention_function(tiny_checkpoints: dict[str, str]) -> None:
    """What the engines' Transformers backends rely on: the model computes attention with the function registered
    under config._attn_implementation, which receives the module (its layer_idx and scaling) and the keyword
    arguments the caller passed to the model."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen = []

    def recording_attention(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, module.scaling, kwargs.get("engine_step")))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("fmbc_test_recording", recording_attention)
    model = FMBCForCausalLM.from_pretrained(tiny_checkpoints["binary"], dtype=torch.float32,
                                            attn_implementation="fmbc_test_recording").eval()
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        logits = model(ids, use_cache=False, engine_step=7).logits
        torch.testing.assert_close(logits, load(tiny_checkpoints["binary"])(ids).logits, rtol=1e-5, atol=1e-5)
    assert seen == [(i, model.config.head_dim**-0.5, 7) for i in range(model.config.num_hidden_layers)]


def test_cache_name_shim_is_still_needed() -> None:
    """`kv_cache`, `update_cache` and CACHE_FIELD exist for transformers releases before 5.24 (`past_key_values`):
    once the oldest supported release is 5.24 or newer, this fails so that the shim is removed."""
    oldest = versions.CORE_RANGES["transformers"][0]
    assert versions.release(oldest) < (5, 24), f"oldest supported transformers is {oldest}: drop the cache-name shim"


def test_remote_code_refuses_an_older_transformers() -> None:
    check_transformers(TRANSFORMERS_TESTED[0])
    check_transformers("9.0.0")  # newer is not refused
    with pytest.raises(ImportError, match=r"needs transformers >= 5\.16\.1 \(tested 5\.16\.1 to 5\.24\.0\); this "
                                          r"environment has transformers 4\.57\.6"):
        check_transformers("4.57.6")
