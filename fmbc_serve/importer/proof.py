"""The proof: the written checkpoint, loaded back by our reference, against the foreign model in float32."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling_fmbc import FMBCForCausalLM
from ..tolerances import FP32_PARITY
from .errors import ImportRefused, few
from .source import logits_of, observe_stream
from .structure import Structure


def our_stream_modules(model: FMBCForCausalLM) -> list[nn.Module]:
    """The modules of our model that receive the residual stream at each depth: every block's first norm, then
    the final norm (the foreign side is `Structure.stream_modules`)."""
    return [layer.input_layernorm for layer in model.model.layers] + [model.model.norm]


def first_divergence(foreign: nn.Module, structure: Structure, ours: FMBCForCausalLM, ids: torch.Tensor) -> str:
    """Which stage's output first differs between the two models on `ids` (the diagnosis of a failed proof)."""
    theirs = observe_stream(foreign, structure.stream_modules(foreign), ids)
    mine = observe_stream(ours, our_stream_modules(ours), ids)
    for i, (a, b) in enumerate(zip(theirs, mine, strict=True)):
        delta = float((a - b).abs().max())
        if delta > FP32_PARITY * max(1.0, float(a.abs().max())):
            stage = "the input code" if i == 0 else f"layer {i - 1}'s output"
            return f"{stage} first differs (max |Δ| {delta:.2e})"
    return "every layer's output agrees; the final norm or head differs"


def greedy(model: nn.Module, prompt: torch.Tensor, steps: int) -> list[int]:
    """`steps` greedy tokens after `prompt` [1, T], by full re-forwards (foreign code may have no KV cache)."""
    ids = prompt
    for _ in range(steps):
        with torch.no_grad():
            ids = torch.cat([ids, logits_of(model, ids)[:, -1:].argmax(-1)], dim=1)
    return ids[0, prompt.shape[1]:].tolist()


def prove(foreign: nn.Module, structure: Structure, ours: FMBCForCausalLM, progress: bool = False,
          chunk: int = 1024) -> dict:
    """Run both models in fp32 on every id as a one-token input and on random sequences up to the context
    length; raise ImportRefused (with the first diverging layer) unless max |Δlogit| ≤ FP32_PARITY and every
    greedy token agrees. Returns the figures."""
    from tqdm import tqdm

    vocab, context = ours.config.vocab_size, ours.config.max_position_embeddings
    single_worst, worst_ids, disagree = 0.0, None, []
    for start in tqdm(range(0, vocab, chunk), desc="proof: every id", disable=not progress):
        ids = torch.arange(start, min(vocab, start + chunk)).unsqueeze(1)
        with torch.no_grad():
            a, b = logits_of(foreign, ids)[:, -1], logits_of(ours, ids)[:, -1]
        delta = (a - b).abs().amax(-1)
        if float(delta.max()) > single_worst:
            single_worst, worst_ids = float(delta.max()), ids[int(delta.argmax())].unsqueeze(0)
        disagree += ids[a.argmax(-1) != b.argmax(-1), 0].tolist()
    gen = torch.Generator().manual_seed(3)
    lengths = sorted({context, max(1, context // 2), min(context, 37), min(context, 5)}, reverse=True)
    worst, sequence_worst = single_worst, 0.0
    for length in tqdm(lengths, desc="proof: sequences", disable=not progress):
        ids = torch.randint(0, vocab, (1, length), generator=gen)
        with torch.no_grad():
            a, b = logits_of(foreign, ids), logits_of(ours, ids)
        delta = float((a - b[:, -a.shape[1]:]).abs().max())
        if delta > sequence_worst:
            sequence_worst = delta
            if delta > worst:
                worst, worst_ids = delta, ids
    steps = min(8, context - 1)
    prompts = [torch.randint(0, vocab, (1, max(1, min(16, context - steps))), generator=gen) for _ in range(3)]
    continuations = [(greedy(foreign, p, steps), greedy(ours, p, steps)) for p in prompts]
    figures = {"single_token_ids": vocab, "max_abs_delta_logit_single_token": single_worst,
               "sequence_lengths": lengths, "max_abs_delta_logit_sequences": sequence_worst,
               "max_abs_delta_logit": worst, "greedy_next_token_disagreements": len(disagree),
               "greedy_continuations": f"{sum(x == y for x, y in continuations)}/{len(continuations)} equal "
                                       f"({steps} tokens)",
               "tolerance": FP32_PARITY}
    if worst > FP32_PARITY or disagree or any(x != y for x, y in continuations):
        where = first_divergence(foreign, structure, ours, worst_ids if worst_ids is not None else prompts[0])
        raise ImportRefused(f"the converted model does not reproduce the source: max |Δlogit| {worst:.2e} "
                            f"(tolerance {FP32_PARITY:g}), {len(disagree)} single-token greedy disagreement(s) "
                            f"{few(disagree)}, greedy continuations {figures['greedy_continuations']}; {where}")
    return figures
