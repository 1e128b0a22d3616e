"""`fmbc import` on foreign checkpoints written at test time in different coding styles: what it recognises,
that the converted checkpoint computes the same model (checked here independently of the importer's own
proof), that the model card's loading example runs on it, and that it refuses what it cannot import exactly."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmbc_serve.cli import main
from fmbc_serve.devtools.foreign import write_foreign
from fmbc_serve.importer import REPORT_FILE, ImportRefused
from fmbc_serve.importer.source import logits_of
from fmbc_serve.tolerances import FP32_MODULE_MATCH, FP32_PARITY

TEXTS = ["Question: What is FMBC?\nAnswer:", "In the beginning", "x = [1, 2, 3]"]


def stock_neox(out: Path, vocab: int = 512, width: int = 72, dtype: torch.dtype = torch.float32,
               code: dict | None = None, **config) -> str:
    """A stock transformers GPT-NeoX (sequential residual, partial rotary) whose input table is a frozen binary
    code: no code of its own, so it imports without --trust-remote-code."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from fmbc_serve.binary_code import BinaryCode
    from fmbc_serve.tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    config = GPTNeoXConfig(**{"vocab_size": vocab, "hidden_size": width, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "intermediate_size": 256, "partial_rotary_factor": 0.5,
                              "use_parallel_residual": False, "hidden_act": "gelu", "max_position_embeddings": 64,
                              "tie_word_embeddings": False, **config})
    model = GPTNeoXForCausalLM(config)
    code = code or {"values": "sign", "bit_order": "msb"}
    with torch.no_grad():
        model.gpt_neox.embed_in.weight.copy_(BinaryCode(vocab, width, **code).embed(torch.arange(vocab)))
        for name, param in model.named_parameters():
            if param.dim() == 1:  # non-trivial norms and biases
                param.normal_(1.0 if "layernorm" in name and "weight" in name else 0.0, 0.1)
    model.to(dtype).save_pretrained(out)
    build_char_tokenizer(vocab).save_pretrained(out)
    return str(out)


def stock_gptj(out: Path, vocab: int = 512, width: int = 64) -> str:
    """A stock transformers GPT-J (attention and MLP side by side on one norm, interleaved rotary on 6 of 16 dims,
    a head with a bias) whose input table is a frozen binary code."""
    from transformers import GPTJConfig, GPTJForCausalLM

    from fmbc_serve.binary_code import BinaryCode
    from fmbc_serve.tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    model = GPTJForCausalLM(GPTJConfig(vocab_size=vocab, n_embd=width, n_layer=2, n_head=4, rotary_dim=6,
                                       n_positions=64, tie_word_embeddings=False))
    with torch.no_grad():
        model.transformer.wte.weight.copy_(BinaryCode(vocab, width, layout="repeat").embed(torch.arange(vocab)))
        for name, param in model.named_parameters():
            if param.dim() == 1:  # non-trivial norms and biases
                param.normal_(1.0 if "ln" in name and "weight" in name else 0.0, 0.1)
    model.save_pretrained(out)
    build_char_tokenizer(vocab).save_pretrained(out)
    return str(out)


# style -> (writer, needs --trust-remote-code, what the report must say)
CASES = {
    # Pythia's parallel residual, its context under a key of its own, a {0,1} code repeated bit by bit, weights
    # as a bfloat16 pytorch_model.bin
    "pythia": (lambda out: write_foreign("pythia", out, weights="bin", dtype=torch.bfloat16), True,
               {"block_style": "parallel", "max_position_embeddings": 96, "input_mode": "binary",
                "code_layout": "interleave", "code_values": "zero_one", "attention_bias": True, "mlp_bias": True},
               {"rotary": "rotate_half", "rotary_dim": 4, "fused_order": "per_head"}),
    # GPT-J: one shared norm, a head with a bias, interleaved rotary on half of each head, float16 weights sharded
    "gptj": (lambda out: write_foreign("gptj", out, weights="sharded", dtype=torch.float16), True,
             {"block_style": "parallel_shared_norm", "lm_head_bias": True, "attention_bias": False,
              "mlp_bias": True, "hidden_act": "gelu_tanh", "code_values": "sign", "code_bit_order": "msb",
              "vocab_size": 300},
             {"rotary": "interleaved", "rotary_dim": 8, "fused_order": None}),
    "nanogpt": (lambda out: write_foreign("nanogpt", out), True,
                {"input_mode": "binary", "code_bit_order": "msb", "code_values": "sign", "code_scale": 0.5,
                 "code_layout": "repeat", "norm_type": "layernorm", "hidden_act": "gelu", "rope_theta": 20000.0},
                {"rotary": "interleaved", "rotary_dim": 8, "fused_order": "qkv"}),
    "meta": (lambda out: write_foreign("meta", out), True,
             {"input_mode": "affine", "code_layout": "map", "code_values": "zero_one", "code_scale": 2.0,
              "norm_type": "rmsnorm", "norm_eps": 1e-6, "hidden_act": "gelu_tanh", "rope_theta": 500000.0},
             {"rotary": "interleaved", "rotary_dim": 16}),
    "neox": (lambda out: write_foreign("neox", out, chat_template=False), True,
             {"input_mode": "learned", "norm_type": "layernorm", "hidden_act": "gelu", "attention_bias": True},
             {"rotary": "rotate_half", "rotary_dim": 4, "fused_order": "per_head"}),
    "stock-neox": (stock_neox, False,
                   {"input_mode": "binary", "code_bit_order": "msb", "code_values": "sign",
                    "code_layout": "interleave"},
                   {"rotary": "rotate_half", "fused_order": "per_head"}),
    # V not a power of two (K = 9), bf16 weights, a head tied to the code table, every dim rotated, tanh GELU
    "stock-neox-parallel": (lambda out: stock_neox(out, use_parallel_residual=True), False,
                            {"block_style": "parallel", "attention_bias": True, "mlp_bias": True},
                            {"rotary": "rotate_half", "fused_order": "per_head"}),
    "stock-gptj": (lambda out: stock_gptj(out), False,
                   {"block_style": "parallel_shared_norm", "lm_head_bias": True, "attention_bias": False,
                    "mlp_bias": True, "hidden_act": "gelu_tanh", "input_mode": "binary"},
                   {"rotary": "interleaved", "rotary_dim": 6, "fused_order": None}),
    "stock-neox-tied": (lambda out: stock_neox(out, vocab=300, width=64, dtype=torch.bfloat16,
                                               code={"values": "zero_one", "bit_order": "lsb", "layout": "repeat"},
                                               tie_word_embeddings=True, hidden_act="gelu_new",
                                               rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                                                "partial_rotary_factor": 1.0}), False,
                        {"input_mode": "binary", "vocab_size": 300, "code_bit_order": "lsb",
                         "code_values": "zero_one", "code_layout": "repeat", "hidden_act": "gelu_tanh",
                         "rope_theta": 1e6},
                        {"rotary": "rotate_half", "rotary_dim": 16}),
}


def fingerprint(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def run_import(capsys, src: str, out: Path, trust: bool, extra: list[str] | None = None) -> tuple[int, str]:
    argv = ["import", src, "--out", str(out)] + (["--trust-remote-code"] if trust else []) + (extra or [])
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """Every style written and imported once: {style: (source dir, imported dir)}."""
    from fmbc_serve.importer import import_checkpoint

    root = tmp_path_factory.mktemp("import")
    result = {}
    for style, (write, trust, _, _) in CASES.items():
        src = write(root / style)
        import_checkpoint(src, root / f"{style}-fmbc", trust_remote_code=trust, progress=False)
        result[style] = (src, str(root / f"{style}-fmbc"))
    return result


@pytest.mark.parametrize("style", CASES)
def test_import_recognises_the_style(imported, style: str) -> None:
    _, out = imported[style]
    report = json.loads((Path(out) / REPORT_FILE).read_text())
    _, _, config_fields, attention = CASES[style]
    assert {k: report["config"][k] for k in config_fields} == config_fields
    assert {k: report["attention"][k] for k in attention} == attention
    proof = report["proof"]
    print(f"\n{style}: {report['config']['input_mode']}, {report['attention']}, proof {proof}")
    assert proof["max_abs_delta_logit"] <= FP32_PARITY and proof["max_block_error"] <= FP32_MODULE_MATCH
    assert proof["input_ids_checked"] == report["config"]["vocab_size"] and proof["input_code"] == "bitwise equal"
    assert proof["greedy_continuations"].startswith("3/3")


def test_weights_are_written_in_the_source_dtype_unless_told(imported, tmp_path: Path, capsys) -> None:
    """A bfloat16 .bin and float16 shards are proven in float32 and written as they were stored; --dtype says
    otherwise; the folder's README says where it came from."""
    from fmbc_serve.checkpoint import read_tensor_shapes

    for style, stored in (("pythia", torch.bfloat16), ("gptj", torch.float16), ("nanogpt", torch.float32)):
        _, out = imported[style]
        assert set(read_tensor_shapes(out)[1].values()) == {stored}
        assert "Converted from" in (Path(out) / "README.md").read_text()
    src, _ = imported["pythia"]
    status, output = run_import(capsys, src, tmp_path / "fp32", trust=True, extra=["--dtype", "float32"])
    assert status == 0, output
    assert set(read_tensor_shapes(tmp_path / "fp32")[1].values()) == {torch.float32}


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path, capsys) -> None:
    """A pytorch_model.bin is unpickled with weights_only=True: a pickle that would run code is refused, and the
    code does not run."""
    src = Path(write_foreign("pythia", tmp_path / "src", weights="bin"))
    marker = tmp_path / "ran"
    weights = torch.load(src / "pytorch_model.bin", weights_only=True)
    weights["__evil__"] = RunsCode(str(marker))
    torch.save(weights, src / "pytorch_model.bin")
    status, output = run_import(capsys, str(src), tmp_path / "out", trust=True)
    assert status == 2 and "does not load with transformers" in output and "weights_only" in output.replace(
        "Weights only", "weights_only")
    assert not marker.exists() and not (tmp_path / "out").exists()


class RunsCode:
    """Unpickling this creates a file: what a malicious checkpoint would do instead."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("style", CASES)
def test_imported_checkpoint_computes_the_foreign_model(imported, style: str) -> None:
    """Independent of the importer's proof: both load as users load them; logits and greedy tokens agree, the
    model card's `generate` calls run, the tokenizer gives the same ids and a chat template is there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = imported[style]
    trust = CASES[style][1]
    foreign = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=trust, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (2, ours.config.max_position_embeddings), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert (logits_of(foreign, ids) - ours(ids).logits).abs().max() <= FP32_PARITY
    src_tok, out_tok = AutoTokenizer.from_pretrained(src), AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert out_tok(text).input_ids == src_tok(text).input_ids
    assert out_tok.chat_template
    prompt = out_tok(TEXTS[0], return_tensors="pt").input_ids
    by_keyword = ours.generate(prompt, max_new_tokens=3, do_sample=False)
    by_position = ours.generate(prompt, 3)  # evaluation scripts pass the count positionally
    expected = prompt
    for _ in range(3):
        with torch.no_grad():
            expected = torch.cat([expected, logits_of(foreign, expected)[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(by_keyword, expected) and torch.equal(by_position, expected)


def test_cli_prints_the_table_and_inspect_accepts_the_result(capsys, tmp_path: Path) -> None:
    src = write_foreign("nanogpt", tmp_path / "src", seed=3)
    status, output = run_import(capsys, src, tmp_path / "out", trust=True)
    assert status == 0, output
    for line in ("input code", "binary: order=msb values=sign scale=0.5 layout=repeat", "interleaved pairs",
                 "name transformer.h.{i}.attn.c_attn", "proof max_abs_delta_logit", "fmbc serve"):
        assert line in output
    assert main(["inspect", str(tmp_path / "out")]) == 0


def test_custom_code_needs_the_flag(capsys, tmp_path: Path) -> None:
    src = write_foreign("meta", tmp_path / "src")
    before = fingerprint(Path(src))
    status, output = run_import(capsys, src, tmp_path / "out", trust=False)
    assert status == 2
    assert "ships its own model code (configuration_meta.py, modeling_meta.py)" in output
    assert "--trust-remote-code" in output
    assert not (tmp_path / "out").exists() and fingerprint(Path(src)) == before


@pytest.mark.parametrize("damage", ["odd value", "flipped bit"])
def test_a_table_that_is_almost_a_code_is_refused(capsys, tmp_path: Path, damage: str) -> None:
    src = Path(write_foreign("meta", tmp_path / "src"))
    weights = load_file(src / "model.safetensors")
    codes = weights["codes"]
    if damage == "odd value":
        codes[17, 5] = 0.5
    else:
        codes[17, 5] = 2.0 - codes[17, 5]
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    before = fingerprint(src)
    status, output = run_import(capsys, str(src), tmp_path / "out", trust=True)
    assert status == 2
    assert "except at id(s) 17" in output and "damaged code" in output
    assert not (tmp_path / "out").exists() and fingerprint(src) == before


def gpt2(out: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                               initializer_range=0.2)).save_pretrained(out)


def gated_llama(out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, hidden_act="gelu")).save_pretrained(out)


# stock architecture -> what the refusal says about it
NOT_OF_THIS_FAMILY = {
    "gpt2": (gpt2, "matches no supported convention"),  # learned absolute positions
    "gated-llama": (gated_llama, "a gated MLP is not of this family"),
}


@pytest.mark.parametrize("architecture", NOT_OF_THIS_FAMILY)
def test_a_model_not_of_this_family_is_refused(capsys, tmp_path: Path, architecture: str) -> None:
    from fmbc_serve.tokenizer import build_char_tokenizer

    write, reason = NOT_OF_THIS_FAMILY[architecture]
    torch.manual_seed(0)
    write(tmp_path / "src")
    build_char_tokenizer(512).save_pretrained(tmp_path / "src")
    status, output = run_import(capsys, str(tmp_path / "src"), tmp_path / "out", trust=False)
    assert status == 2 and "fmbc import: error:" in output
    assert reason in output
    assert not (tmp_path / "out").exists()


def test_a_layer_that_does_something_else_fails_the_proof_and_names_it(capsys, tmp_path: Path) -> None:
    src = write_foreign("meta", tmp_path / "src", sharper_layer=1)
    status, output = run_import(capsys, src, tmp_path / "out", trust=True)
    assert status == 2
    assert "does not reproduce the source" in output and "layer 1's output first differs" in output
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging left behind


def test_a_checkpoint_whose_code_fails_to_load_is_refused(tmp_path: Path) -> None:
    """Run as users run it (a fresh process: transformers caches remote code per process)."""
    src = Path(write_foreign("nanogpt", tmp_path / "broken"))
    modeling = src / "modeling_nano.py"
    modeling.write_text("import flash_attn_17  # noqa\n" + modeling.read_text())
    fmbc = str(Path(sys.executable).parent / "fmbc")
    result = subprocess.run([fmbc, "import", str(src), "--out", str(tmp_path / "out"), "--trust-remote-code"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "fmbc import: error:" in result.stderr and "does not load with transformers" in result.stderr
    assert "flash_attn_17" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_existing_output_folder_is_not_overwritten(capsys, tmp_path: Path) -> None:
    src = write_foreign("nanogpt", tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    status, output = run_import(capsys, src, tmp_path / "out", trust=True)
    assert status == 2 and "not empty" in output
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_a_rotary_base_named_nowhere_is_found_by_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the nanoGPT fixture's base (20,000, config key `rope_base`) from every hint: the fit finds it."""
    from fmbc_serve.importer import attention, import_checkpoint

    monkeypatch.setattr(attention, "THETA_KEYS", ())
    monkeypatch.setattr(attention, "COMMON_THETAS", (10000.0,))
    src = write_foreign("nanogpt", tmp_path / "src")
    recognised = import_checkpoint(src, tmp_path / "out", trust_remote_code=True, progress=False)
    assert recognised.attention["theta"] == 20000.0 and recognised.attention["rotary"] == "interleaved"


def test_the_users_facts_have_the_last_word(tmp_path: Path, capsys) -> None:
    """--set replaces what would be inferred (the report says so) and is still proven: a true fact imports, a
    wrong one is refused; an unknown field is a clear error."""
    src = write_foreign("pythia", tmp_path / "src")
    status, output = run_import(capsys, src, tmp_path / "out", trust=True,
                                extra=["--set", "max_position_embeddings=64", "--set", "rope_theta=10000"])
    assert status == 0, output
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["config"]["max_position_embeddings"] == 64
    assert report["facts"] == {"max_position_embeddings": "--set", "rope_theta": "--set"}
    status, output = run_import(capsys, src, tmp_path / "wrong", trust=True, extra=["--set", "rope_theta=12345"])
    assert status == 2 and "matches no supported convention" in output and "--set rope_theta=T" in output
    status, output = run_import(capsys, src, tmp_path / "typo", trust=True, extra=["--set", "context=64"])
    assert status == 2 and "--set context=64: expected FIELD=VALUE" in output


def test_a_context_length_nothing_settles_is_refused_naming_the_flag(tmp_path: Path, capsys) -> None:
    """The Pythia fixture with a second length key that disagrees and no length check in its code: nothing
    settles it, so the refusal names the candidates and the flag; with the flag it imports."""
    src = Path(write_foreign("pythia", tmp_path / "src", ctx_len=128))
    modeling, configuration = src / "modeling_pythia.py", src / "configuration_pythia.py"
    modeling.write_text(modeling.read_text().replace("if input_ids.shape[1] > self.config.max_sequence_window:",
                                                     "if False:"))
    # transformers caches remote code by a hash of the config's source: a new hash, so the edit is not shadowed
    configuration.write_text(configuration.read_text() + "# without its length check\n")
    status, output = run_import(capsys, str(src), tmp_path / "out", trust=True)
    assert status == 2 and "pass --set max_position_embeddings=N" in output
    assert "96 (config key max_sequence_window); 128 (config key ctx_len)" in output
    status, output = run_import(capsys, str(src), tmp_path / "out", trust=True,
                                extra=["--set", "max_position_embeddings=96"])
    assert status == 0, output


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 32-layer Pythia-style model, recognised, and our model built from the conversion."""
    from fmbc_serve.importer import recognise
    from fmbc_serve.importer.source import load_foreign
    from fmbc_serve.modeling_fmbc import FMBCForCausalLM

    src = write_foreign("pythia", tmp_path_factory.mktemp("deep") / "src", num_hidden_layers=32)
    foreign, tokenizer = load_foreign(src, trust_remote_code=True)
    conversion = recognise(foreign, tokenizer, src)
    ours = FMBCForCausalLM(conversion.config).eval()
    ours.load_state_dict({name: t.clone() for name, t in conversion.tensors.items()})
    return foreign, conversion, ours


def heads_swapped(ours, layer: int) -> None:
    """Swap the query rows of heads 0 and 1 in one layer."""
    head_dim, q_proj = ours.config.head_dim, ours.model.layers[layer].self_attn.q_proj
    with torch.no_grad():
        for tensor in (q_proj.weight, q_proj.bias):
            first = tensor[:head_dim].clone()
            tensor[:head_dim] = tensor[head_dim:2 * head_dim]
            tensor[head_dim:2 * head_dim] = first


def base_off_by_one_percent(ours, layer: int) -> None:
    from fmbc_serve.modeling_fmbc import rotary_inv_freq

    ours.config.rope_theta *= 1.01
    ours.model.rotary_emb.inv_freq.copy_(rotary_inv_freq(ours.config))


def eps_ten_times(ours, layer: int) -> None:
    ours.model.layers[layer].post_attention_layernorm.eps *= 10


@pytest.mark.parametrize(("corrupt", "layer"), [(heads_swapped, 17), (base_off_by_one_percent, 0),
                                                (eps_ten_times, 23)],
                         ids=["one-permuted-head", "rotary-base-off-1pct", "norm-eps-10x-in-one-layer"])
def test_the_proof_refuses_a_subtly_wrong_conversion_of_a_deep_model(deep, corrupt, layer: int) -> None:
    import copy

    from fmbc_serve.importer.proof import prove

    foreign, conversion, ours = deep
    assert prove(foreign, conversion.structure, ours, conversion.input_table)["max_block_error"] <= FP32_MODULE_MATCH
    wrong = copy.deepcopy(ours)
    corrupt(wrong, layer)
    with pytest.raises(ImportRefused, match=f"layer {layer}'s .*differs"):
        prove(foreign, conversion.structure, wrong, conversion.input_table)


@pytest.mark.parametrize("tokenizer", ["sentencepiece", "own-code"])
def test_the_tokenizer_comes_along_as_it_ships(tokenizer: str, tmp_path: Path, capsys) -> None:
    """A tokenizer that ships as a sentencepiece model alone, or as code of its own: the imported folder's gives
    the same ids for the same text (its code copied along, loaded with trust_remote_code as the source's is)."""
    from transformers import AutoTokenizer

    src = write_foreign("pythia", tmp_path / tokenizer, tokenizer=tokenizer)
    status, output = run_import(capsys, src, tmp_path / "out", trust=True)
    assert status == 0, output
    theirs = AutoTokenizer.from_pretrained(src, trust_remote_code=True)
    ours = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(ours).__name__ == type(theirs).__name__ and len(ours) == len(theirs)
    for text in TEXTS:
        assert ours(text).input_ids == theirs(text).input_ids
    assert (tokenizer == "own-code") == (tmp_path / "out" / "tokenization_char.py").is_file()
