"""The character tokenizer: exactly V entries, code points as ids, specials in the private-use area."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from fmbc_serve.tokenizer import build_char_tokenizer, special_token_ids


def test_paper_tokenizer_is_the_authors_style(tmp_path) -> None:
    build_char_tokenizer(65536).save_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == 65536
    text = "Hello, wörld — ∑ 漢字!\n\tend"
    ids = tokenizer(text)["input_ids"]
    assert ids == [ord(ch) for ch in text]
    assert tokenizer.decode(ids) == text
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [
        57344, 57345, 57346, 57347]
    assert tokenizer("😀")["input_ids"] == [57347]  # outside the BMP: <unk>


def test_small_vocab_puts_specials_last() -> None:
    tokenizer = build_char_tokenizer(512)
    assert len(tokenizer) == 512
    assert special_token_ids(512) == {"<pad>": 508, "<s>": 509, "</s>": 510, "<unk>": 511}
    assert tokenizer("Ā")["input_ids"] == [256]
    assert tokenizer("ȿ")["input_ids"] == [511]  # U+023F is past the 508 character ids


def test_chat_template_uses_the_model_card_prompt_style() -> None:
    tokenizer = build_char_tokenizer(512)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "Be brief.\n\nQuestion: What is 2+2?\nAnswer: 4\n\nQuestion: And 3+3?\nAnswer:"


def test_vocab_too_small_for_specials() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_char_tokenizer(4)
