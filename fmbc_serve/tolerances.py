"""Every numerical tolerance fmbc-serve accepts, named once, with the reason for its size.

Two float32 computations of the same model differ only by rounding: another summation order (a fused q/k/v
matmul, the engines' kernels, SDPA against a hand-written softmax), about 1e-7 relative per op. Anything a
tolerance lets through must be smaller than any real difference a wrong conversion or a wrong kernel makes.
"""

FP32_PARITY = 1e-4
"""Largest |Δlogprob| (engine vs reference) or |Δlogit| (imported vs source model) between two float32
computations of one model. Measured: ≤ 2e-6 on the test checkpoints, 3e-5 at the paper's width and vocabulary."""

FP32_MODULE_MATCH = 1e-5
"""Largest error, relative to the output's scale, under which a foreign module (a norm, an MLP, a block) probed
by the importer counts as computing our formula. One module's float32 rounding is ~1e-7 relative; the nearest
wrong candidates (exact vs tanh GELU on the probe, a rotary base off by 1 %) are ≥ 1e-4."""

BF16_LOGPROB = 0.1
"""Largest |Δlogprob| of the same token, on the same context, between a bfloat16 engine and the reference (in
bf16 or fp32). bf16 keeps 8 significant bits: every stored value, and every logit, is rounded by up to 2^-9 of
itself, ~0.02-0.04 for the logits (|z| up to ~10-20) of the test models, and the two sides round independently
(other kernels, other summation order). Measured (tests/engines/test_bf16.py): ≤ 0.044 on vLLM, ≤ 0.028 on
SGLang, against either reference; 0.1 is twice the largest with room for a longer sequence."""

BF16_TIE = BF16_LOGPROB
"""Largest gap between the reference's best logprob and its logprob of the token a bfloat16 engine chose: two
tokens closer than bf16's rounding of their logprobs are a near-tie that rounding may flip, so exact greedy
equality is not owed in bf16. Measured: ≤ 0.005 (the engine chose the reference's own top token at 71-72 of 72
steps on the tiny model, 96 of 96 on the embedded one)."""

W8A8_BF16_LOGPROB = BF16_LOGPROB + 1e-2
"""W8A8 (int8 weights per channel, int8 activations per token) served in bfloat16, against the full-precision
reference in bfloat16: bf16's rounding plus int8's, which moves logprobs by ≤ 1.6e-3 on the tiny model in fp32
(docs/quantization.md). Measured in bf16: ≤ 0.004."""

# llama.cpp running an exported GGUF (f32 or f16 weights) against the float32 reference, per logprob. Its gptneox
# graph computes GELU with the tanh approximation, looked up in an fp16 table even for f32 tensors (ggml-cpu
# vec.h, GGML_GELU_FP16): each activation is off by up to ~1e-3 from the exact erf GELU FMBC uses, and these add
# up through the blocks. Measured: 1.3e-2 for the embedded default (trained, larger activations), 5e-5 to 3e-4
# for random tiny models; greedy tokens must still be equal.
LLAMA_CPP_LOGPROB = 3e-2
