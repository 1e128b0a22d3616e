"""Offline batch generation with vLLM's `LLM` on an FMBC checkpoint (the plugin registers it; nothing else to do).

    python examples/vllm_offline.py [CHECKPOINT]      # default: the embedded model
"""

import sys

from vllm import LLM, SamplingParams

from fmbc_serve.serve import DEFAULT_MODEL

if __name__ == "__main__":  # vLLM spawns worker processes
    llm = LLM(model=sys.argv[1] if len(sys.argv) > 1 else str(DEFAULT_MODEL), seed=0)
    prompts = ["In the beginning", "And the LORD spake unto Moses, saying,", "Blessed are the"]
    for out in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24)):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r}")
