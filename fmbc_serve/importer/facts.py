"""Facts a foreign config may name under keys we do not know, found from what the checkpoint has; and the user's
own facts (`fmbc import --set FIELD=VALUE`), which have the last word.

No single missing key stops an import: the context length is read from a known key, else from any config value
whose key speaks of a length and that the checkpoint's buffers, its tokenizer or its code's own length check
agree with. Only when nothing answers, or the answers disagree, is the import refused, and the refusal names
the `--set` that resolves it.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator

import torch
from torch import nn

from ..configuration_fmbc import FMBCConfig
from .errors import ImportRefused
from .source import observe_stream

# Config keys foreign code uses for the context length (the first one set wins).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "block_size", "max_seq_len", "n_ctx", "context_length",
                "seq_length", "max_sequence_length")
# Words by which an unknown key speaks of a length; generation settings that do too, but are not the context.
LENGTH_WORDS = ("position", "ctx", "context", "seq", "len", "window", "token")
NOT_CONTEXT = {"max_length", "min_length", "max_new_tokens", "min_new_tokens", "max_time", "max_batch_tokens"}
# Longest sequence tried when looking for the code's own length check (the forward stops at the first block, but
# code may build a [T, T] mask before it: 8,192² floats are 256 MiB).
LONGEST_PROBE = 8192
# A tokenizer's model_max_length at or above this is transformers' "no limit" placeholder.
NO_TOKENIZER_LIMIT = 10**9


def config_fields() -> tuple[str, ...]:
    """FMBCConfig's own fields (what `--set` may name)."""
    return tuple(name for name, p in inspect.signature(FMBCConfig.__init__).parameters.items()
                 if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """`FIELD=VALUE` strings -> {field: value}. FIELD must be an FMBCConfig field; VALUE is read as JSON (`2048`,
    `1e-6`, `true`, `[1, 2]`), else taken as a string (`gelu_tanh`). FMBCConfig validates the values later."""
    overrides: dict[str, object] = {}
    for pair in pairs:
        field, sep, text = pair.partition("=")
        if not sep or field not in config_fields():
            raise ImportRefused(f"--set {pair}: expected FIELD=VALUE with FIELD one of the config fields "
                                f"({', '.join(config_fields())})")
        try:
            overrides[field] = json.loads(text)
        except json.JSONDecodeError:
            overrides[field] = text
    return overrides


def context_length(model: nn.Module, first_block: nn.Module, tokenizer: object, overrides: dict[str, object]
                   ) -> tuple[int, str]:
    """(the context length, where it came from): the user's `--set max_position_embeddings`, else a known config
    key, else a config value under a key that speaks of a length (when such keys disagree, the one that other
    witnesses confirm), else what buffers shaped by the length (a causal mask, a rotary cache), the tokenizer's
    model_max_length and the code's own length check (the longest input it accepts) agree on. Refused, naming
    the candidates and the `--set` to pass, when nothing answers or the answers disagree."""
    if "max_position_embeddings" in overrides:
        return int(overrides["max_position_embeddings"]), "--set"
    config = model.config
    for key in CONTEXT_KEYS:
        if isinstance(value := getattr(config, key, None), int) and not isinstance(value, bool):
            return value, f"config key {key}"
    keys = _witnesses(_length_keys(config.to_dict()))
    if len(keys) == 1:
        ((value, sources),) = keys.items()
        return value, " and ".join(sources)
    others = _witnesses([*_buffer_lengths(model), _tokenizer_limit(tokenizer)])
    if limit := longest_accepted(model, first_block, sorted({*keys, *others})):
        others.setdefault(limit, []).append("the model's own length check")
    if keys:  # several keys: the one another witness confirms
        confirmed = {value: keys[value] + others[value] for value in keys if value in others}
    else:  # no key: what the other witnesses agree on, or the only one there is
        confirmed = {v: s for v, s in others.items() if len(s) > 1} or (others if len(others) == 1 else {})
    if len(confirmed) == 1:
        ((value, sources),) = confirmed.items()
        return value, " and ".join(sources)
    found = "; ".join(f"{value} ({', '.join(sources)})" for value, sources in sorted({**others, **keys}.items()))
    raise ImportRefused(f"the config names no context length under a known key ({', '.join(CONTEXT_KEYS)}), and "
                        + (f"what the checkpoint says does not settle it: {found}" if found else
                           "nothing in the checkpoint gives one (no config value, buffer, tokenizer limit or "
                           "length check)")
                        + "; pass --set max_position_embeddings=N with the length it was trained for")


def _witnesses(pairs) -> dict[int, list[str]]:
    """value -> the sources that give it, from (source, value) pairs (None values dropped)."""
    found: dict[int, list[str]] = {}
    for source, value in pairs:
        if value is not None:
            found.setdefault(value, []).append(source)
    return found


def _length_keys(config: dict, prefix: str = "") -> Iterator[tuple[str, int]]:
    """(config key, value) for every positive integer under a key that speaks of a length, one level of nesting
    deep (rope_scaling's original_max_position_embeddings)."""
    for key, value in config.items():
        if isinstance(value, dict) and not prefix:
            yield from _length_keys(value, prefix=f"{key}.")
        elif (isinstance(value, int) and not isinstance(value, bool) and value > 1 and key not in NOT_CONTEXT
              and any(word in key.lower() for word in LENGTH_WORDS) and not key.endswith("_id")):
            yield f"config key {prefix}{key}", value


def _buffer_lengths(model: nn.Module) -> Iterator[tuple[str, int]]:
    """Lengths that buffers are shaped by: a square causal mask [..., T, T], a cached rotary table [T, r]."""
    for name, buffer in model.named_buffers():
        if buffer.dim() >= 2 and buffer.shape[-1] == buffer.shape[-2] > 1 and buffer.dtype == torch.bool or (
                buffer.dim() >= 2 and "mask" in name.lower() and buffer.shape[-1] == buffer.shape[-2] > 1):
            yield f"buffer {name} {list(buffer.shape)}", buffer.shape[-1]
        elif buffer.dim() == 2 and any(word in name.lower() for word in ("cos", "sin", "rope", "rotary", "freqs")):
            yield f"buffer {name} {list(buffer.shape)}", buffer.shape[0]


def _tokenizer_limit(tokenizer: object) -> tuple[str, int | None]:
    limit = getattr(tokenizer, "model_max_length", None)
    usable = isinstance(limit, int) and 1 < limit < NO_TOKENIZER_LIMIT
    return "the tokenizer's model_max_length", limit if usable else None


def longest_accepted(model: nn.Module, first_block: nn.Module, candidates: list[int]) -> int | None:
    """The longest input the model's code accepts, where it refuses longer ones (nanoGPT's `assert t <=
    block_size`, a position table that runs out); None if it takes everything up to LONGEST_PROBE. Each try
    stops at the first block. Candidates are checked first (n accepted, n + 1 refused), then a binary search."""
    def accepts(length: int) -> bool:
        try:
            observe_stream(model, [first_block], torch.zeros(1, length, dtype=torch.long), stop_after_first=True)
        except Exception:  # noqa: BLE001 (foreign code refuses as it likes)
            return False
        return True

    for length in candidates:
        if accepts(length) and not accepts(length + 1):
            return length
    if accepts(LONGEST_PROBE):
        return None
    low, high = 1, LONGEST_PROBE  # accepts(low), not accepts(high)
    if not accepts(low):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if accepts(middle) else (low, middle)
    return low
