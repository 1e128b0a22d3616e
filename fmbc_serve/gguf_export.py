"""`fmbc export DIR --to gguf`: an FMBC checkpoint as llama.cpp's `gptneox` model, written with `gguf` (the writer
llama.cpp's own converter uses), so that llama.cpp and what is built on it (its server, Ollama, LM Studio) run it
without fmbc-serve.

The fixed code is a function of the token id alone, so the input is written as an ordinary token-embedding tensor:
row i is what the model's own input module gives token i (the fixed code, the affine recode or the learned table;
exact, V x d values). Above it an FMBC model with LayerNorm, the GELU MLP, rotate-half rotary (partial or full) and
an untied head is the GPT-NeoX graph, sequential or parallel residual; llama.cpp insists on biases FMBC may lack,
written as zeros. What that graph cannot compute is refused before anything is written, naming the config field.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .configuration_fmbc import FMBCConfig

ARCH = "gptneox"
# outtype -> (how 2-D weights are stored, the file type llama.cpp reports). Norms and biases stay float32, as in
# llama.cpp's converter.
OUTTYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
            "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
SPM_SPACE = "\u2581"  # sentencepiece's escaped space: llama.cpp's unigram and SPM tokenizers read every " " as it


class ExportRefused(ValueError):
    """The checkpoint uses something llama.cpp's graph cannot compute (or cannot tokenize): nothing was written."""


def refusals(config: FMBCConfig) -> list[str]:
    """Why llama.cpp's `gptneox` graph cannot run CONFIG, one reason per config field (empty: it can)."""
    reasons = []
    if config.norm_type != "layernorm":
        reasons.append(f"norm_type={config.norm_type!r}: llama.cpp's gptneox graph normalises with LayerNorm "
                       "(weight and bias) only")
    if config.block_style == "parallel_shared_norm":
        reasons.append("block_style='parallel_shared_norm' (GPT-J's one norm for both branches): gptneox has a "
                       "norm per branch, and llama.cpp's gptj graph rotates interleaved pairs, not halves")
    if config.lm_head_bias:
        reasons.append("lm_head_bias=True: gptneox's output projection has no bias")
    if getattr(config, "quantization_config", None):
        reasons.append("quantization_config: a quantized checkpoint; export the unquantized one and pick "
                       "--outtype q8_0")
    return reasons


@dataclass
class Vocabulary:
    """What llama.cpp needs to tokenize like the checkpoint's tokenizer."""

    model: str  # llama.cpp's tokenizer type: "t5" (unigram), "gpt2" (byte-level BPE), "llama" (sentencepiece BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    add_space_prefix: bool = False
    note: str = ""


def char_vocabulary(tokenizer) -> Vocabulary:
    """Our character tokenizer (id = code point) as a unigram vocabulary of single characters, all scored alike, so
    llama.cpp's unigram (UGM) tokenizer maps each character to its own id and a character outside the vocabulary
    to `<unk>`, as ours does (its SPM tokenizer would fall back to byte tokens, which a character vocabulary lacks,
    and abort). The space is written as sentencepiece's escaped space, which llama.cpp reads every space as; the
    character U+2581 itself, which it cannot tell from a space, becomes an unused entry."""
    import gguf

    specials = set(tokenizer.all_special_tokens)
    tokens, types = [], []
    for i, text in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if text in specials:
            kind = gguf.TokenType.UNKNOWN if text == tokenizer.unk_token else gguf.TokenType.CONTROL
        elif len(text) != 1 or text == SPM_SPACE:
            text, kind = f"<U+{i:04X}>", gguf.TokenType.UNUSED
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(SPM_SPACE if text == " " else text)
        types.append(int(kind))
    return Vocabulary("t5", tokens, types, scores=[0.0] * len(tokens),
                      note="character vocabulary as a unigram of single characters; U+2581 reads as a space")


def bpe_vocabulary(tokenizer, spec: dict) -> Vocabulary:
    """A byte-level BPE (tokenizer.json) as llama.cpp's `gpt2` tokenizer: the same tokens, merges and GPT-2
    pre-tokenizer split."""
    import gguf

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    if [s.get("type") for s in steps] != ["ByteLevel"] or not steps[0].get("use_regex", True) \
            or steps[0].get("add_prefix_space"):
        raise ExportRefused(f"tokenizer: a BPE whose pre-tokenizer is {pre.get('type')!r} with {steps}: llama.cpp's "
                            "tokenizers split text as GPT-2's byte-level BPE or as sentencepiece (spaces as ▁) only")
    specials = set(tokenizer.all_special_tokens) | {t["content"] for t in spec.get("added_tokens", [])}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    types = [int(gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL) for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return Vocabulary("gpt2", tokens, types, merges=merges, pre="gpt-2")


def space_prefix(spec: dict) -> bool | None:
    """Whether a sentencepiece-style tokenizer.json puts "▁" before the text, as llama.cpp's SPM tokenizer
    can (True/False), or None if its text handling is not "spaces become ▁" (a Metaspace pre-tokenizer without
    splitting, or the older Prepend + Replace normalizer)."""
    pre, normalizer = spec.get("pre_tokenizer"), spec.get("normalizer")
    if pre and pre.get("type") == "Metaspace" and pre.get("replacement") == SPM_SPACE and not pre.get("split") \
            and normalizer is None:
        return pre.get("prepend_scheme", "always") != "never"
    steps = (normalizer or {}).get("normalizers", [])
    escapes = {"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE}
    if pre is None and escapes in steps and all(step in (escapes, {"type": "Prepend", "prepend": SPM_SPACE})
                                                for step in steps):
        return {"type": "Prepend", "prepend": SPM_SPACE} in steps
    return None


def sentencepiece_vocabulary(tokenizer, spec: dict, add_space_prefix: bool) -> Vocabulary:
    """A sentencepiece BPE (tokenizer.json as transformers converts one: BPE over text whose spaces are "▁",
    byte fallback) as llama.cpp's SPM tokenizer, as llama.cpp's converter writes Llama's: the same pieces, scored
    in vocabulary order (a sentencepiece BPE numbers its pieces by merge priority, and llama.cpp's SPM merges the
    pair whose piece scores highest), the 256 byte pieces as bytes. Without byte pieces llama.cpp aborts on a
    character outside the vocabulary: refused."""
    import gguf

    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    byte_pieces = {f"<0x{byte:02X}>" for byte in range(256)}
    if not spec["model"].get("byte_fallback") or not byte_pieces <= set(tokens):
        raise ExportRefused("tokenizer: a sentencepiece BPE without byte fallback (the 256 <0xXX> pieces): "
                            "llama.cpp's SPM tokenizer aborts on a character outside such a vocabulary")
    specials = set(tokenizer.all_special_tokens) | {t["content"] for t in spec.get("added_tokens", [])}
    types, scores = [], []
    for i, text in enumerate(tokens):
        kind = (gguf.TokenType.UNKNOWN if text == tokenizer.unk_token else gguf.TokenType.CONTROL if text in specials
                else gguf.TokenType.BYTE if text in byte_pieces else gguf.TokenType.NORMAL)
        types.append(int(kind))
        scores.append(-float(i) if kind == gguf.TokenType.NORMAL else 0.0)
    return Vocabulary("llama", tokens, types, scores=scores, add_space_prefix=add_space_prefix,
                      note="sentencepiece BPE as llama.cpp's SPM tokenizer")


def vocabulary(checkpoint_dir: Path) -> tuple[Vocabulary, object]:
    """The checkpoint's tokenizer in llama.cpp's terms, or ExportRefused naming what llama.cpp cannot read."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    spec_file = checkpoint_dir / "tokenizer.json"
    spec = json.loads(spec_file.read_text()) if spec_file.exists() else {}
    model = (spec.get("model") or {}).get("type")
    pre = spec.get("pre_tokenizer") or {}
    if model == "WordLevel" and pre.get("type") == "Split" and pre.get("pattern", {}).get("Regex") == r"[\s\S]":
        return char_vocabulary(tokenizer), tokenizer
    if model == "BPE":
        prefix = space_prefix(spec)
        vocab = bpe_vocabulary(tokenizer, spec) if prefix is None else sentencepiece_vocabulary(tokenizer, spec, prefix)
        return vocab, tokenizer
    raise ExportRefused(f"tokenizer: {model or 'no tokenizer.json'} is not a tokenizer this exporter writes for "
                        "llama.cpp (it writes fmbc-serve's character tokenizer, byte-level BPE and sentencepiece "
                        "BPE)")


def gguf_tensors(model: torch.nn.Module, config: FMBCConfig) -> dict[str, torch.Tensor]:
    """llama.cpp's gptneox tensors, by its names, from the reference model (float32). The token embedding is the
    model's own input module applied to every id; Q, K and V are stacked in that order, as the graph splits them."""
    d, body = config.hidden_size, model.model

    def bias(linear: torch.nn.Linear, size: int) -> torch.Tensor:
        return linear.bias if linear.bias is not None else torch.zeros(size)

    with torch.no_grad():
        tensors = {"token_embd.weight": body.embed_tokens(torch.arange(config.vocab_size)).float(),
                   "output_norm.weight": body.norm.weight, "output_norm.bias": body.norm.bias,
                   "output.weight": model.lm_head.weight}
        for i, layer in enumerate(body.layers):
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            tensors |= {
                f"blk.{i}.attn_norm.weight": layer.input_layernorm.weight,
                f"blk.{i}.attn_norm.bias": layer.input_layernorm.bias,
                f"blk.{i}.attn_qkv.weight": torch.cat([p.weight for p in projections]),
                f"blk.{i}.attn_qkv.bias": torch.cat([bias(p, d) for p in projections]),
                f"blk.{i}.attn_output.weight": attn.o_proj.weight,
                f"blk.{i}.attn_output.bias": bias(attn.o_proj, d),
                f"blk.{i}.ffn_norm.weight": layer.post_attention_layernorm.weight,
                f"blk.{i}.ffn_norm.bias": layer.post_attention_layernorm.bias,
                f"blk.{i}.ffn_up.weight": mlp.up_proj.weight,
                f"blk.{i}.ffn_up.bias": bias(mlp.up_proj, config.intermediate_size),
                f"blk.{i}.ffn_down.weight": mlp.down_proj.weight,
                f"blk.{i}.ffn_down.bias": bias(mlp.down_proj, d),
            }
    return {name: tensor.detach().float().contiguous() for name, tensor in tensors.items()}


def stored(tensor: torch.Tensor, outtype: str) -> tuple[np.ndarray, object]:
    """The tensor as written for OUTTYPE: 1-D tensors in float32; 2-D weights in the outtype, except that a row
    q8_0 cannot block (its length not a multiple of 32) stays f16, as llama.cpp's converter does."""
    import gguf

    data = tensor.numpy()
    kind = gguf.GGMLQuantizationType[OUTTYPES[outtype][0]]
    if data.ndim == 1 or kind == gguf.GGMLQuantizationType.F32:
        return data, gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, kind), kind
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def export_gguf(checkpoint_dir: str | Path, out_file: str | Path, outtype: str = "f32") -> dict:
    """Write CHECKPOINT_DIR as a GGUF file for llama.cpp; refuse (ExportRefused) before writing anything if llama.cpp
    cannot run it exactly, or if OUT_FILE exists. Returns a summary: tensors, sizes, the tokenizer written."""
    import gguf

    from .checkpoint import load_config
    from .parity import load_reference

    checkpoint_dir, out_file = Path(checkpoint_dir), Path(out_file)
    if outtype not in OUTTYPES:
        raise ExportRefused(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    if out_file.exists():
        raise ExportRefused(f"{out_file} exists: not overwritten (remove it or choose another --out)")
    config = load_config(checkpoint_dir)
    reasons = refusals(config)
    if reasons:
        raise ExportRefused("llama.cpp cannot run this checkpoint exactly: " + "; ".join(reasons))
    vocab, tokenizer = vocabulary(checkpoint_dir)
    if len(vocab.tokens) != config.vocab_size:
        raise ExportRefused(f"vocab_size={config.vocab_size} but the tokenizer has {len(vocab.tokens)} entries: "
                            "llama.cpp needs one token per embedding row")

    model = load_reference(str(checkpoint_dir))
    partial = out_file.with_name(f".{out_file.name}.partial")
    writer = gguf.GGUFWriter(partial, ARCH)
    writer.add_name(checkpoint_dir.name)
    writer.add_description(f"FMBC ({config.input_mode} input, {config.block_style} blocks) exported by fmbc-serve")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_attention_heads)
    writer.add_rope_dimension_count(config.rotary_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_eps(config.norm_eps)
    writer.add_parallel_residual(config.block_style == "parallel")
    writer.add_file_type(gguf.LlamaFileType[OUTTYPES[outtype][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_add_bos_token(False)  # our tokenizers add no special tokens to a prompt
    writer.add_add_eos_token(False)
    if vocab.model in ("t5", "llama"):
        writer.add_add_space_prefix(vocab.add_space_prefix)
        writer.add_remove_extra_whitespaces(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    written: dict[str, int] = {}
    for name, tensor in gguf_tensors(model, config).items():
        data, kind = stored(tensor, outtype)
        writer.add_tensor(name, data, raw_dtype=kind)
        written[kind.name] = written.get(kind.name, 0) + 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, out_file)  # the finished file appears at once, never half-written
    finally:
        partial.unlink(missing_ok=True)
    embedding = config.vocab_size * config.hidden_size
    return {"file": str(out_file), "bytes": out_file.stat().st_size, "outtype": outtype, "tensors": written,
            "token_embedding": f"{config.vocab_size} x {config.hidden_size} ({embedding:,} values, from the "
                               f"{config.input_mode} input)", "tokenizer": vocab.model, "note": vocab.note}
