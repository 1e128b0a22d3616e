"""Character-level tokenizer in the FMBC author's style, built locally with the `tokenizers` library.

Token id = Unicode code point of a BMP character, so the binary code of an id is the code point's own bits.
The four special tokens sit in the private-use area from U+E000 (`<pad>` 57344, `<s>` 57345, `</s>` 57346,
`<unk>` 57347) when V > 0xE003; for a smaller V (test models) they take the last four ids instead. Ids that
are not a usable character (UTF-16 surrogates U+D800-U+DFFF) get placeholder names `<U+XXXX>` so that the
vocabulary has exactly V entries; characters outside [0, V) encode as `<unk>`.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PRIVATE_USE_START = 0xE000

# The model card's prompt style: "Question: ...\nAnswer:". System text, if any, comes first.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'Question: ' + message['content'] + '\\n' }}"
    "{%- else -%}{{ 'Answer: ' + message['content'] + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Answer:' }}{%- endif -%}"
)


def special_token_ids(vocab_size: int) -> dict[str, int]:
    """Where the special tokens live for a vocabulary of `vocab_size` ids."""
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 1}, got {vocab_size}")
    start = PRIVATE_USE_START if vocab_size > PRIVATE_USE_START + 3 else vocab_size - len(SPECIAL_TOKENS)
    return {token: start + i for i, token in enumerate(SPECIAL_TOKENS)}


def char_vocab(vocab_size: int) -> dict[str, int]:
    """Token string -> id for all V ids."""
    specials = {i: token for token, i in special_token_ids(vocab_size).items()}
    vocab = {}
    for i in range(vocab_size):
        if i in specials:
            vocab[specials[i]] = i
        elif 0xD800 <= i <= 0xDFFF:
            vocab[f"<U+{i:04X}>"] = i
        else:
            vocab[chr(i)] = i
    return vocab


def build_char_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer with exactly `vocab_size` entries and the chat template."""
    core = Tokenizer(models.WordLevel(char_vocab(vocab_size), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = _wrap(core)
    if len(tokenizer) != vocab_size:
        raise AssertionError(f"tokenizer has {len(tokenizer)} entries, expected {vocab_size}")
    return tokenizer


def train_bpe_tokenizer(text: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of exactly `vocab_size` entries trained on `text` (deterministic), with the four special
    tokens at ids 0-3 and the chat template: the tokenizer of models trained by `fmbc train`."""
    from tokenizers import trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    if core.get_vocab_size() != vocab_size:
        raise ValueError(f"the text yields only {core.get_vocab_size()} BPE entries, fewer than {vocab_size}")
    return _wrap(core)


def _wrap(core: Tokenizer) -> PreTrainedTokenizerFast:
    pad, bos, eos, unk = SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk,
        clean_up_tokenization_spaces=False, model_max_length=1 << 30,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
