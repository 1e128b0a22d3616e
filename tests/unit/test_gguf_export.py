"""`fmbc export --to gguf`: the file read back with gguf's own reader (what llama.cpp will load): llama.cpp's
gptneox keys, every tensor under its llama.cpp name and shape, the token embedding equal to the model's own input
on every id (fixed code, affine recode, learned table), Q/K/V stacked as the graph splits them, zero biases where
FMBC has none, the tokenizer's entries; and the refusals (before anything is written, an existing file kept).
llama.cpp running the files is the llama suite's (tests/engines/test_llama_cpp.py)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from fmbc_serve.checkpoint import init_checkpoint, make_config, save_checkpoint  # noqa: E402
from fmbc_serve.cli import main  # noqa: E402
from fmbc_serve.configuration_fmbc import INPUT_MODES  # noqa: E402
from fmbc_serve.devtools.foreign import write_foreign  # noqa: E402
from fmbc_serve.gguf_export import SPM_SPACE, ExportRefused, export_gguf  # noqa: E402
from fmbc_serve.importer import import_checkpoint  # noqa: E402
from fmbc_serve.modeling_fmbc import FMBCForCausalLM  # noqa: E402
from fmbc_serve.parity import load_reference  # noqa: E402
from fmbc_serve.tokenizer import train_bpe_tokenizer  # noqa: E402


def read(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(key -> value, tensor name -> float32 array in PyTorch's [out, in] order) of a GGUF file."""
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {}
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        tensors[tensor.name] = np.asarray(data, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
    return fields, tensors


@pytest.mark.parametrize("mode", INPUT_MODES)
@pytest.mark.parametrize("block_style", ["sequential", "parallel"])
def test_export_maps_every_tensor_and_key(mode: str, block_style: str, tmp_path: Path) -> None:
    config = make_config("tiny", input_mode=mode, block_style=block_style, attention_bias=block_style == "parallel",
                         partial_rotary_factor=0.5 if block_style == "parallel" else 1.0)
    checkpoint = init_checkpoint(config, tmp_path / "model", seed=3)
    summary = export_gguf(checkpoint, tmp_path / "model.gguf")
    fields, tensors = read(tmp_path / "model.gguf")
    model = load_reference(str(checkpoint))
    d, layers = config.hidden_size, config.num_hidden_layers

    assert fields["general.architecture"] == "gptneox"
    assert fields["gptneox.context_length"] == config.max_position_embeddings
    assert fields["gptneox.embedding_length"] == d and fields["gptneox.block_count"] == layers
    assert fields["gptneox.feed_forward_length"] == config.intermediate_size
    assert fields["gptneox.attention.head_count"] == config.num_attention_heads
    assert fields["gptneox.rope.dimension_count"] == config.rotary_dim
    assert fields["gptneox.use_parallel_residual"] == (block_style == "parallel")
    assert fields["gptneox.attention.layer_norm_epsilon"] == pytest.approx(config.norm_eps)
    assert len(tensors) == 4 + 12 * layers and summary["tensors"] == {"F32": 4 + 12 * layers}

    with torch.no_grad():
        rows = model.model.embed_tokens(torch.arange(config.vocab_size)).numpy()
    np.testing.assert_array_equal(tensors["token_embd.weight"], rows)  # every id, exactly
    np.testing.assert_array_equal(tensors["output.weight"], model.lm_head.weight.detach().numpy())
    attn = model.model.layers[1].self_attn
    qkv = tensors["blk.1.attn_qkv.weight"]
    for part, projection in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
        np.testing.assert_array_equal(qkv[part * d:(part + 1) * d], projection.weight.detach().numpy())
        if block_style == "parallel":
            np.testing.assert_array_equal(tensors["blk.1.attn_qkv.bias"][part * d:(part + 1) * d],
                                          projection.bias.detach().numpy())
    assert not tensors["blk.0.ffn_up.bias"].any()  # no MLP bias in FMBC: zeros, as llama.cpp insists on one


def test_outtypes_store_weights_as_asked_and_keep_norms_f32(tmp_path: Path) -> None:
    checkpoint = init_checkpoint(make_config("tiny"), tmp_path / "model", seed=0)
    reference = read(export_gguf(checkpoint, tmp_path / "f32.gguf")["file"])[1]
    for outtype, kind, tolerance in [("f16", "F16", 1e-3), ("bf16", "BF16", 1e-2), ("q8_0", "Q8_0", 2e-2)]:
        summary = export_gguf(checkpoint, tmp_path / f"{outtype}.gguf", outtype)
        assert summary["tensors"] == {kind: 2 + 4 * 2, "F32": 2 + 8 * 2}, summary
        tensors = read(tmp_path / f"{outtype}.gguf")[1]
        for name, exact in reference.items():
            if exact.ndim == 1:
                np.testing.assert_array_equal(tensors[name], exact)
            else:
                assert np.abs(tensors[name] - exact).max() <= tolerance * max(1.0, np.abs(exact).max()), name


def test_character_tokenizer_is_written_one_character_per_id(tmp_path: Path) -> None:
    checkpoint = init_checkpoint(make_config("tiny"), tmp_path / "model", seed=0)
    fields = read(Path(export_gguf(checkpoint, tmp_path / "model.gguf")["file"]))[0]
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "t5" and len(tokens) == 512
    assert tokens[ord("a")] == "a" and tokens[ord(" ")] == SPM_SPACE and tokens[ord("\n")] == "\n"
    assert fields["tokenizer.ggml.add_space_prefix"] is False and fields["tokenizer.ggml.add_bos_token"] is False
    assert tokens[fields["tokenizer.ggml.eos_token_id"]] == "</s>"
    assert fields["tokenizer.chat_template"].startswith("{%- for message in messages")


def test_byte_level_bpe_is_written_with_its_merges(tmp_path: Path) -> None:
    rng = random.Random(0)
    text = "\n".join(" ".join("".join(rng.choices("abcdefghij", k=rng.randint(2, 6))) for _ in range(12))
                     for _ in range(300))
    tokenizer = train_bpe_tokenizer(text, 512)
    config = make_config("tiny", bos_token_id=1, eos_token_id=2, pad_token_id=0)
    checkpoint = save_checkpoint(FMBCForCausalLM(config), tokenizer, tmp_path / "model")
    fields = read(Path(export_gguf(checkpoint, tmp_path / "model.gguf")["file"]))[0]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tokenizer.get_vocab()
    assert [vocab[t] for t in fields["tokenizer.ggml.tokens"]] == list(range(512))
    assert len(fields["tokenizer.ggml.merges"]) == 512 - 4 - 256


def imported_with_sentencepiece(tmp_path: Path, tokenizer: str) -> Path:
    """A foreign checkpoint whose tokenizer ships as a sentencepiece model alone, imported."""
    src = write_foreign("pythia", tmp_path / "src", tokenizer=tokenizer, vocab_size=512, hidden_size=72,
                        num_attention_heads=3)  # 9 bits lift to 72; head size 24, a quarter of it rotary
    import_checkpoint(src, tmp_path / "model", trust_remote_code=True, progress=False)
    return tmp_path / "model"


def test_sentencepiece_bpe_is_written_as_llama_cpp_spm(tmp_path: Path) -> None:
    """The imported sentencepiece BPE (byte fallback, as Llama's): llama.cpp's "llama" tokenizer with the same
    pieces, scored in vocabulary order, byte pieces typed as bytes, the space prefix as transformers adds it."""
    from transformers import AutoTokenizer

    checkpoint = imported_with_sentencepiece(tmp_path, "sentencepiece-bytes")
    fields = read(Path(export_gguf(checkpoint, tmp_path / "model.gguf")["file"]))[0]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert fields["tokenizer.ggml.model"] == "llama" and tokens == tokenizer.convert_ids_to_tokens(list(range(512)))
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE and types[tokenizer.unk_token_id] == 2
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    normal = [i for i, kind in enumerate(types) if kind == gguf.TokenType.NORMAL]
    scores = fields["tokenizer.ggml.scores"]
    assert [scores[i] for i in normal] == sorted((scores[i] for i in normal), reverse=True)
    assert fields["tokenizer.ggml.add_space_prefix"] is True and fields["tokenizer.ggml.add_bos_token"] is False


def test_sentencepiece_without_byte_fallback_is_refused(tmp_path: Path) -> None:
    checkpoint = imported_with_sentencepiece(tmp_path, "sentencepiece")
    with pytest.raises(ExportRefused, match="without byte fallback"):
        export_gguf(checkpoint, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


@pytest.mark.parametrize(("field", "value", "says"), [
    ("norm_type", "rmsnorm", "norm_type='rmsnorm'"),
    ("block_style", "parallel_shared_norm", "block_style='parallel_shared_norm'"),
    ("lm_head_bias", True, "lm_head_bias=True"),
])
def test_what_llama_cpp_cannot_run_is_refused_before_writing(field: str, value, says: str, tmp_path: Path) -> None:
    checkpoint = init_checkpoint(make_config("tiny", **{field: value}), tmp_path / "model", seed=0)
    with pytest.raises(ExportRefused, match=says):
        export_gguf(checkpoint, tmp_path / "model.gguf")
    assert list(tmp_path.iterdir()) == [tmp_path / "model"]  # nothing written, no partial file


def test_cli_exports_and_never_overwrites(tmp_path: Path, capsys) -> None:
    checkpoint = init_checkpoint(make_config("tiny"), tmp_path / "model", seed=0)
    out = tmp_path / "model.gguf"
    assert main(["export", str(checkpoint), "--to", "gguf", "--out", str(out), "--outtype", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().out and out.stat().st_size > 0
    before = out.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(checkpoint), "--to", "gguf", "--out", str(out)])
    assert exit_info.value.code == 2 and "exists: not overwritten" in capsys.readouterr().err
    assert out.read_bytes() == before
