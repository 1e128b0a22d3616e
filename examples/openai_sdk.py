"""The OpenAI Python SDK against an FMBC server: a completion, a streamed completion, and logprobs.

    python examples/openai_sdk.py [--base-url http://localhost:30000/v1] [--model fmbc]
"""

import argparse
import os

from openai import OpenAI

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", default="http://localhost:30000/v1")
parser.add_argument("--model", default="fmbc")
args = parser.parse_args()
# OPENAI_API_KEY, as the OpenAI SDKs read it, only for a server started with an API key
client = OpenAI(base_url=args.base_url, api_key=os.environ.get("OPENAI_API_KEY", "unused"))

completion = client.completions.create(model=args.model, prompt="In the beginning", max_tokens=32, temperature=0)
print("completion:", repr(completion.choices[0].text))

print("stream:    ", end="")
for chunk in client.completions.create(model=args.model, prompt="And the LORD said", max_tokens=32, stream=True,
                                       temperature=0.8, seed=0):
    print(chunk.choices[0].text if chunk.choices else "", end="", flush=True)
print()

scored = client.completions.create(model=args.model, prompt="Blessed are", max_tokens=5, temperature=0, logprobs=3)
logprobs = scored.choices[0].logprobs
for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
    print(f"logprobs:   {token!r:>12} {logprob:8.3f}  top-3 {top}")
