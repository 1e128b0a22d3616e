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

BF16_LOGPROB = 0.2
"""Largest |Δlogprob| of the same token between a bfloat16 engine and the reference (bf16 or fp32), on the same
context. (Provisional: to be set from measurements.)"""

BF16_TIE = 0.2
"""Largest gap between the reference's best logprob and its logprob of the token a bfloat16 engine chose: a token
this close to the best is a near-tie that bf16 rounding may flip. (Provisional.)"""

W8A8_BF16_LOGPROB = 0.3
"""W8A8 (int8 weights per channel, int8 activations per token) served in bfloat16, against the full-precision
reference in bfloat16: bf16's rounding (BF16_LOGPROB) plus int8's. (Provisional: to be set from measurements.)"""
