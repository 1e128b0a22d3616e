"""Engine parity: does an engine compute the same model as the reference?

Runs token-id prompts greedily through the transformers reference (float32) and through an engine's runner
(`fmbc_serve.engines.<engine>.runner.greedy`), then compares greedy tokens and the log-probabilities of the
tokens each side saw: decode steps up to the first divergence, and the prompt tokens (prefill). The one parity
harness: `fmbc parity DIR --engine vllm|sglang` and the engine tests use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_PROMPTS = (
    "Question: What is the capital of France?\nAnswer:",
    "In the beginning",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "def fibonacci(n):\n    ",
    "A",
)


@dataclass
class Completion:
    """One greedy completion: the generated ids, their logprobs, and logprobs of prompt tokens 1..n-1."""

    tokens: list[int]
    token_logprobs: list[float]
    prompt_logprobs: list[float]


@dataclass
class PromptParity:
    prompt_tokens: int
    agree: bool
    first_divergence: int | None
    max_decode_delta: float
    max_prefill_delta: float

    @property
    def max_delta(self) -> float:
        return max(self.max_decode_delta, self.max_prefill_delta)


def load_reference(checkpoint: str, adapter: str | None = None, dtype: torch.dtype = torch.float32
                   ) -> torch.nn.Module:
    """The transformers reference in `dtype` (float32 unless told), with a PEFT LoRA adapter applied (unmerged)
    when given."""
    from .modeling_fmbc import FMBCForCausalLM

    model = FMBCForCausalLM.from_pretrained(checkpoint, dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


def reference_greedy(checkpoint: str, prompts: list[list[int]], max_new_tokens: int,
                     adapter: str | None = None) -> list[Completion]:
    """Greedy decoding with the float32 reference (plus `adapter`, a PEFT LoRA directory), one prompt at a time
    (no padding)."""
    model = load_reference(checkpoint, adapter)
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            # An explicit mask: generate() would otherwise infer one from pad_token_id and mask prompt tokens
            # that happen to equal it.
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, min_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=0)
            full = out[0]
            logprobs = torch.log_softmax(model(full.unsqueeze(0), use_cache=False).logits[0].float(), dim=-1)
            picked = logprobs[:-1].gather(-1, full[1:].unsqueeze(-1)).squeeze(-1).tolist()
            n = len(prompt)
            results.append(Completion(full[n:].tolist(), picked[n - 1:], picked[:n - 1]))
    return results


def compare(reference: Completion, engine: Completion, prompt_tokens: int) -> PromptParity:
    """Tokens must agree; logprobs are compared up to and including the first divergent step."""
    divergence = next((i for i, (a, b) in enumerate(zip(reference.tokens, engine.tokens, strict=False)) if a != b),
                      None)
    steps = len(reference.tokens) if divergence is None else divergence + 1
    decode = [abs(a - b) for a, b in zip(reference.token_logprobs[:steps], engine.token_logprobs[:steps],
                                         strict=False)]
    prefill = [abs(a - b) for a, b in zip(reference.prompt_logprobs, engine.prompt_logprobs, strict=True)]
    agree = divergence is None and len(reference.tokens) == len(engine.tokens)
    return PromptParity(prompt_tokens, agree, divergence, max(decode, default=0.0), max(prefill, default=0.0))


def run_parity(checkpoint: str, engine: str, prompts: list[list[int]], max_new_tokens: int) -> list[PromptParity]:
    """Reference vs engine on every prompt."""
    from .engines import runner

    engine_results = runner(engine).greedy(checkpoint, prompts, max_new_tokens)
    reference_results = reference_greedy(checkpoint, prompts, max_new_tokens)
    return [compare(ref, eng, len(prompt))
            for ref, eng, prompt in zip(reference_results, engine_results, prompts, strict=True)]


@dataclass
class CloseParity:
    """An engine's greedy completion judged by the reference on the engine's own tokens (teacher forcing), for
    reduced precision, where rounding may flip a near-tie and exact token equality is not owed."""

    steps: int
    reference_argmax: int  # steps where the engine chose the reference's own top token
    max_tie_gap: float  # largest (reference's best logprob - its logprob of the engine's token)
    max_logprob_delta: float  # largest |engine's logprob - reference's| of the engine's token


def compare_close(checkpoint: str, prompts: list[list[int]], engine: list[Completion],
                  dtype: torch.dtype) -> list[CloseParity]:
    """Run the reference in `dtype` on each prompt followed by the engine's tokens, so both see the same context
    at every step: how far each engine token is from the reference's best choice there, and how far apart the
    two logprobs of that token are."""
    model = load_reference(checkpoint, dtype=dtype)
    rows = []
    with torch.no_grad():
        for prompt, completion in zip(prompts, engine, strict=True):
            tokens = torch.tensor(completion.tokens)
            full = torch.cat([torch.tensor(prompt), tokens]).unsqueeze(0)
            logprobs = torch.log_softmax(model(full, use_cache=False).logits[0].float(), dim=-1)
            steps = logprobs[len(prompt) - 1:-1]
            chosen = steps.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            rows.append(CloseParity(
                steps=len(tokens),
                reference_argmax=int((steps.argmax(-1) == tokens).sum()),
                max_tie_gap=float((steps.max(-1).values - chosen).max()),
                max_logprob_delta=float((chosen - torch.tensor(completion.token_logprobs)).abs().max())))
    return rows


def reference_embeddings(checkpoint: str, prompts: list[list[int]], normalize: bool = True) -> torch.Tensor:
    """[len(prompts), hidden] float32 sentence embeddings as an engine's embedding mode computes them for a
    causal LM: the final norm's hidden state at each prompt's last token, L2-normalised (vLLM's
    `--convert embed` default: LAST pooling, normalize=True)."""
    model = load_reference(checkpoint)
    with torch.no_grad():
        rows = [model.model(torch.tensor([prompt]), use_cache=False).last_hidden_state[0, -1] for prompt in prompts]
    embeddings = torch.stack(rows).float()
    return torch.nn.functional.normalize(embeddings, dim=-1) if normalize else embeddings
