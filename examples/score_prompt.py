"""Score text with an FMBC server: echo the prompt, generate nothing, read each prompt token's logprob.

This is what lm-eval's `local-completions` does for log-likelihood tasks.
    python examples/score_prompt.py [--base-url http://localhost:30000/v1] [--model fmbc]
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

for text in ("And God saw the light, that it was good.", "light good the that it saw was God And."):
    out = client.completions.create(model=args.model, prompt=text, max_tokens=0, echo=True, logprobs=1)
    logprobs = [lp for lp in out.choices[0].logprobs.token_logprobs if lp is not None]  # the first token has none
    print(f"{sum(logprobs):9.2f} total logprob over {len(logprobs) + 1} tokens: {text!r}")
