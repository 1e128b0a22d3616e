"""The proof: the written checkpoint, loaded back by our reference, against the foreign model in float32.

Three parts, each cheap at the published size and sharp at any depth:
- the input stage on every id, bitwise: it is the code (or the table), so nothing less than equality will do;
- every block on random sequences up to the context length, one at a time: our block i is run on exactly what
  the foreign block i received, and its output compared with the foreign block's, relative to what that block
  adds to the stream. A small error in one layer of a deep model (a permuted head, a rotary base off by 1 %) is
  not diluted by the 31 layers around it; and the logits of the whole model;
- every norm against its foreign twin on probe inputs small enough that eps matters: in a deep stream of
  large variance, an eps off by 10× moves a block's output by less than float32 rounding;
- greedy continuations, token for token.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling_fmbc import FMBCForCausalLM, embed_input, layer_input
from ..tolerances import FP32_MODULE_MATCH, FP32_PARITY
from .errors import ImportRefused, format_ids
from .source import logits_of, streams_and_logits
from .structure import Structure

GREEDY_PROMPTS = 3
GREEDY_STEPS = 8


def greedy(model: nn.Module, prompt: torch.Tensor, steps: int) -> list[int]:
    """`steps` greedy tokens after `prompt` [1, T], by full re-forwards (foreign code may have no KV cache)."""
    ids = prompt
    for _ in range(steps):
        with torch.no_grad():
            ids = torch.cat([ids, logits_of(model, ids)[:, -1:].argmax(-1)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def block_errors(ours: FMBCForCausalLM, streams: list[torch.Tensor]) -> list[float]:
    """For each block i: our block run on the foreign stream entering block i, against the foreign stream
    leaving it, as max |Δ| over max |what the foreign block added|."""
    length = streams[0].shape[1]
    positions = torch.arange(length).unsqueeze(0)
    rotary = ours.model.rotary_emb(positions)
    errors = []
    with torch.no_grad():
        for layer, x, target in zip(ours.model.layers, streams, streams[1:], strict=False):
            output, residual = layer(*layer_input(layer, x), rotary, None, None)  # no mask: causal
            added = float((target - x).abs().max())
            errors.append(float((output + residual - target).abs().max()) / max(added, 1e-30))
    return errors


def norm_errors(foreign: nn.Module, structure: Structure, ours: FMBCForCausalLM) -> dict[str, float]:
    """Each of our norms against the foreign norm it came from, on inputs of variance 1 and of variance 1e-8
    (where eps dominates), as the largest error relative to the output's scale: {where: error}."""
    pairs = [(f"layer {i}'s attention norm", block.get_submodule(structure.layout.attn_norm), layer.input_layernorm)
             for i, (block, layer) in enumerate(zip(structure.blocks, ours.model.layers, strict=True))]
    if structure.layout.mlp_norm:
        pairs += [(f"layer {i}'s MLP norm", block.get_submodule(structure.layout.mlp_norm),
                   layer.post_attention_layernorm)
                  for i, (block, layer) in enumerate(zip(structure.blocks, ours.model.layers, strict=True))]
    pairs.append(("the final norm", foreign.get_submodule(structure.final_norm_name), ours.model.norm))
    probe = torch.randn(2, 3, structure.width, generator=torch.Generator().manual_seed(5))
    errors = {}
    with torch.no_grad():
        for where, theirs, mine in pairs:
            errors[where] = max(float((theirs(x).float() - mine(x)).abs().max()) / max(float(mine(x).abs().max()), 1.0)
                                for x in (probe, probe * 1e-4))
    return errors


def prove(foreign: nn.Module, structure: Structure, ours: FMBCForCausalLM, table: torch.Tensor,
          progress: bool = False) -> dict:
    """Prove `ours` computes `foreign` (float32): the input stage equal to the foreign first block's input
    `table` [V, d] on every id, every block within FP32_MODULE_MATCH of the foreign one on random sequences, the
    logits within FP32_PARITY, and greedy continuations equal. Raise ImportRefused naming what differs first;
    else return the figures."""
    from tqdm import tqdm

    vocab, context = ours.config.vocab_size, ours.config.max_position_embeddings
    with torch.no_grad():
        ours_input = embed_input(ours.model.embed_tokens, torch.arange(vocab), torch.float32)
    differing = (ours_input != table).any(-1).nonzero().flatten().tolist()
    if differing:
        raise ImportRefused(f"the converted model's input differs from the source's at {len(differing)} of {vocab} "
                            f"id(s): {format_ids(differing)}")
    gen = torch.Generator().manual_seed(3)
    lengths = sorted({context, max(1, context // 2), min(context, 37), min(context, 5)}, reverse=True)
    logit_worst, block_worst = 0.0, [0.0] * ours.config.num_hidden_layers
    for length in tqdm(lengths, desc="proof: sequences", disable=not progress):
        ids = torch.randint(0, vocab, (1, length), generator=gen)
        try:
            theirs, their_logits = streams_and_logits(foreign, structure.stream_modules(foreign), ids)
        except Exception as err:  # noqa: BLE001 (foreign code fails as it likes)
            raise ImportRefused(f"the source model fails on a sequence of {length} tokens, the context length "
                                f"found for it ({type(err).__name__}: {err}); pass --set max_position_embeddings=N "
                                "with the length it takes") from err
        with torch.no_grad():
            our_logits = ours(ids, use_cache=False).logits.float()
        logit_worst = max(logit_worst, float((their_logits - our_logits[:, -their_logits.shape[1]:]).abs().max()))
        block_worst = [max(a, b) for a, b in zip(block_worst, block_errors(ours, theirs), strict=True)]
    prompts = [torch.randint(0, vocab, (1, max(1, min(16, context - GREEDY_STEPS))), generator=gen)
               for _ in range(GREEDY_PROMPTS)]
    steps = min(GREEDY_STEPS, context - 1)
    continuations = [(greedy(foreign, p, steps), greedy(ours, p, steps)) for p in prompts]
    equal = sum(theirs == mine for theirs, mine in continuations)
    norms = norm_errors(foreign, structure, ours)
    figures = {"input_ids_checked": vocab, "input_code": "bitwise equal", "sequence_lengths": lengths,
               "max_abs_delta_logit": logit_worst, "max_block_error": max(block_worst, default=0.0),
               "max_norm_error": max(norms.values()),
               "greedy_continuations": f"{equal}/{len(continuations)} equal ({steps} tokens)",
               "tolerances": {"logit": FP32_PARITY, "block": FP32_MODULE_MATCH}}
    bad_layers = [i for i, error in enumerate(block_worst) if error > FP32_MODULE_MATCH]
    bad_norms = [where for where, error in norms.items() if error > FP32_MODULE_MATCH]
    if bad_layers or bad_norms or logit_worst > FP32_PARITY or equal < len(continuations):
        where = (f"layer {bad_layers[0]}'s output first differs (block error {block_worst[bad_layers[0]]:.1e} of "
                 f"what the layer adds, tolerance {FP32_MODULE_MATCH:g})" if bad_layers else
                 f"{bad_norms[0]} differs from the source's on probe inputs (relative error "
                 f"{norms[bad_norms[0]]:.1e})" if bad_norms else "every layer agrees; the head differs")
        raise ImportRefused(f"the converted model does not reproduce the source: max |Δlogit| {logit_worst:.2e} "
                            f"(tolerance {FP32_PARITY:g}), greedy continuations {figures['greedy_continuations']}; "
                            f"{where}")
    return figures
