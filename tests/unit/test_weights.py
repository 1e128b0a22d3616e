"""The one load policy (`fmbc_serve.weights`) without an engine: the bad-checkpoint table on an engine-like model
and through `fmbc inspect`, pipeline stages, and quantized layers (parameters stand in for what an engine's
quantization method makes: int8 `weight` + `weight_scale` on every projection)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from support.bad_checkpoints import ACCEPTED, REFUSED, write_variant
from torch import nn

from fmbc_serve.checkpoint import inspect_checkpoint, make_config
from fmbc_serve.weights import (
    CheckpointError,
    PipelineStage,
    canonical_tensors,
    engine_name,
    load_canonical_weights,
)

CONFIG = make_config("tiny")
WHOLE = PipelineStage()
# Stage 0 of 2: the input and layer 0 (layer 1, the final norm and the head are another stage's).
FIRST_OF_TWO = PipelineStage(frozenset({"model.layers.1", "model.norm", "lm_head"}))
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
               "mlp.down_proj")


def engine_model(tensors: dict[str, torch.Tensor], stage: PipelineStage = WHOLE):
    """Engine-like parameters (q/k/v fused into qkv_proj) for the tensors `stage` holds, each loader recording
    (parameter, shard) and checking the width."""
    calls: list[tuple[str, str | None]] = []
    params: dict[str, nn.Parameter] = {}
    for name, tensor in tensors.items():
        target, _ = engine_name(name)
        if not stage.holds(name) or target in params:
            continue
        shape = list(tensor.shape)
        if ".qkv_proj." in target and name.endswith((".weight", ".bias", ".weight_scale")):
            shape[0] *= 3
        param = nn.Parameter(torch.zeros(shape, dtype=tensor.dtype), requires_grad=False)

        def loader(p, w, shard=None, target=target):
            assert w.shape[-1] == p.shape[-1], f"mismatch {list(w.shape)} vs {list(p.shape)}"
            calls.append((target, shard))

        param.weight_loader = loader
        params[target] = param
    return SimpleNamespace(named_parameters=lambda: params.items()), params, calls


def good_tensors() -> dict[str, torch.Tensor]:
    return {name: torch.zeros(shape) for name, shape in canonical_tensors(CONFIG).items()}


@pytest.mark.parametrize("case", list(REFUSED))
def test_every_reader_refuses_the_bad_checkpoint_with_the_same_words(case: str, tiny_checkpoints,
                                                                     tmp_path: Path) -> None:
    change, message = REFUSED[case]
    bad = write_variant(tiny_checkpoints["binary"], tmp_path / "bad", change)
    tensors = load_file(Path(bad) / "model.safetensors")
    model, _, _ = engine_model(good_tensors())
    with pytest.raises(CheckpointError) as err:
        load_canonical_weights(model, tensors.items(), CONFIG, lambda p, w: None, WHOLE)
    assert message in str(err.value)
    assert any(message in problem for problem in inspect_checkpoint(bad).problems)


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_departures_load(case: str, tiny_checkpoints, tmp_path: Path) -> None:
    ok = write_variant(tiny_checkpoints["binary"], tmp_path / "ok", ACCEPTED[case])
    tensors = load_file(Path(ok) / "model.safetensors")
    model, params, _ = engine_model(good_tensors())
    assert load_canonical_weights(model, tensors.items(), CONFIG, lambda p, w: None, WHOLE) == set(params)
    assert inspect_checkpoint(ok).problems == []


def test_a_pipeline_stage_loads_its_own_layers_and_checks_the_others() -> None:
    """Stage 0 of 2 holds the input and layer 0; layer 1, the norm and the head are checked, not loaded, and a bad
    tensor of theirs is refused all the same."""
    stage = FIRST_OF_TWO
    model, params, calls = engine_model(good_tensors(), stage)
    assert load_canonical_weights(model, good_tensors().items(), CONFIG, lambda p, w: None, stage) == set(params)
    assert not any(".layers.1." in target or target.startswith("lm_head") for target, _ in calls)
    for change, message in (REFUSED["int8 weight"], REFUSED["stray weight_scale, no quantization_config"],
                            REFUSED["mis-shaped tensor"], REFUSED["missing tensor"]):
        tensors = good_tensors()
        change(tensors)
        with pytest.raises(CheckpointError, match="1 problem"):
            load_canonical_weights(model, tensors.items(), CONFIG, lambda p, w: None, stage)
        with pytest.raises(CheckpointError) as err:
            load_canonical_weights(model, tensors.items(), CONFIG, lambda p, w: None, stage)
        assert message.split(" (")[0].split(",")[0] in str(err.value)


QUANTIZED = make_config("tiny", quantization_config={"quant_method": "compressed-tensors"})


def quantized_checkpoint() -> dict[str, torch.Tensor]:
    """Canonical tensors, with every projection as int8 weight + per-channel scale (compressed-tensors W8A8)."""
    tensors = good_tensors()
    for name in list(tensors):
        if name.rpartition(".")[0].endswith(PROJECTIONS) and name.endswith(".weight"):
            tensors[name] = tensors[name].to(torch.int8)
            tensors[name.replace(".weight", ".weight_scale")] = torch.ones(tensors[name].shape[0], 1)
    return tensors


def test_quantized_layers_load_through_their_own_parameters() -> None:
    model, params, calls = engine_model(quantized_checkpoint())
    loaded = load_canonical_weights(model, quantized_checkpoint().items(), QUANTIZED, lambda p, w: None, WHOLE)
    assert loaded == set(params)
    assert ("model.layers.1.self_attn.qkv_proj.weight_scale", "k") in calls


def test_missing_and_misshaped_quantized_tensors_are_named() -> None:
    model, _, _ = engine_model(quantized_checkpoint())
    tensors = quantized_checkpoint()
    del tensors["model.layers.1.self_attn.k_proj.weight_scale"]
    tensors["model.layers.0.mlp.down_proj.weight_scale"] = torch.ones(128, 3)
    tensors["model.layers.0.mlp.down_proj.weight_zero_point"] = torch.zeros(128, 1)
    with pytest.raises(CheckpointError) as err:
        load_canonical_weights(model, tensors.items(), QUANTIZED, lambda p, w: None, WHOLE)
    message = str(err.value)
    assert "missing tensor model.layers.1.self_attn.k_proj.weight_scale" in message
    assert "tensor model.layers.0.mlp.down_proj.weight_scale has shape [128, 3]" in message
    assert "unexpected tensor model.layers.0.mlp.down_proj.weight_zero_point" in message


def test_other_stages_quantized_tensors_are_not_errors_but_strangers_are() -> None:
    stage = FIRST_OF_TWO
    model, params, _ = engine_model(quantized_checkpoint(), stage)
    tensors = quantized_checkpoint()
    assert load_canonical_weights(model, tensors.items(), QUANTIZED, lambda p, w: None, stage) == set(params)
    tensors["model.extra.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.extra\.weight"):
        load_canonical_weights(model, tensors.items(), QUANTIZED, lambda p, w: None, stage)


def test_a_weight_scale_on_a_layer_the_method_leaves_unquantized_is_refused() -> None:
    """With a quantization_config, the head stays in full precision (llm-compressor's default): a scale for it
    has no parameter to go to."""
    tensors = quantized_checkpoint()
    model, _, _ = engine_model(tensors)
    tensors["lm_head.weight_scale"] = torch.ones(512, 1)
    with pytest.raises(CheckpointError, match=r"unexpected tensor lm_head\.weight_scale \(shape \[512, 1\]\): the "
                                              r"quantization method leaves lm_head unquantized"):
        load_canonical_weights(model, tensors.items(), QUANTIZED, lambda p, w: None, WHOLE)


def test_a_stage_is_what_the_engine_did_not_replace_by_a_placeholder() -> None:
    """Placeholders (an engine's PPMissingLayer, vLLM's pooling runner's head) mark what another stage holds;
    nothing else does: a tensor the engine simply lacks is unexpected, not someone else's."""

    class Placeholder(nn.Module):
        pass

    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Linear(2, 2), Placeholder()])
    model.lm_head = Placeholder()
    stage = PipelineStage.of(model, (Placeholder,))
    assert stage.holds("model.layers.0.mlp.up_proj.weight") and stage.holds("model.norm.weight")
    assert not stage.holds("model.layers.1.mlp.up_proj.weight_scale") and not stage.holds("lm_head.weight")
    assert stage.holds("model.layers.10.mlp.up_proj.weight")  # layer 10 is not layer 1
