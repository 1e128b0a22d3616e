"""FMBCConfig: documented defaults, and every inconsistency named by its field."""

from __future__ import annotations

import pytest

from fmbc_serve.checkpoint import PRESETS, make_config
from fmbc_serve.configuration_fmbc import FMBCConfig


def test_defaults_are_the_paper_shape() -> None:
    config = FMBCConfig()
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (
        65536, 1024, 32, 32)
    assert (config.num_code_bits, config.head_dim, config.intermediate_size, config.max_position_embeddings) == (
        16, 32, 4096, 1024)
    assert config.input_mode == "binary" and not config.tie_word_embeddings


@pytest.mark.parametrize(("fields", "field"), [
    ({"input_mode": "table"}, "input_mode"),
    ({"code_bit_order": "big"}, "code_bit_order"),
    ({"code_values": "pm1"}, "code_values"),
    ({"code_layout": "tile"}, "code_layout"),
    ({"code_layout": "map"}, "code_lift_map"),
    ({"code_layout": "map", "code_lift_map": [0] * 1024}, "code_lift_map"),
    ({"code_scale": 0}, "code_scale"),
    ({"norm_type": "batchnorm"}, "norm_type"),
    ({"norm_eps": 0}, "norm_eps"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"partial_rotary_factor": 0.0}, "partial_rotary_factor"),
    ({"partial_rotary_factor": 0.03}, "partial_rotary_factor"),  # 0.96 channels of a 32-wide head
    ({"rope_theta": -1}, "rope_theta"),
    ({"num_attention_heads": 3}, "num_attention_heads"),
    ({"vocab_size": 1}, "vocab_size"),
    ({"hidden_size": 8, "num_attention_heads": 1}, "hidden_size"),  # fewer width positions than 16 bits
    ({"hidden_size": 24, "num_attention_heads": 1}, "code_layout"),  # interleave 16 bits into 24 cuts bits off
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"input_mode": "affine"}, "affine_rows"),
    ({"input_mode": "affine", "affine_rows": [1] * 16, "affine_bias": 0}, "affine_rows"),  # singular
    ({"affine_rows": [1 << i for i in range(16)], "affine_bias": 0}, "affine_rows"),  # affine rows, binary mode
])
def test_inconsistent_fields_name_the_field(fields: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"FMBCConfig\.{field}"):
        FMBCConfig(**fields)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_validate_and_round_trip_through_json(preset: str, tmp_path) -> None:
    config = make_config(preset)
    config.save_pretrained(tmp_path)
    again = FMBCConfig.from_pretrained(tmp_path)
    assert again.to_dict() == config.to_dict()
    assert config.head_dim >= 32  # vLLM's CPU attention needs head_dim >= 32
    if config.input_mode == "affine":
        assert again.binary_code() == config.binary_code()


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        make_config("huge")
