"""Offline batch generation with SGLang's `Engine` on an FMBC checkpoint (the plugin registers it).

    python examples/sglang_offline.py [CHECKPOINT]    # default: the embedded model
On a machine without CUDA it adds the CPU settings `fmbc serve` uses.
"""

import sys

import sglang as sgl

from fmbc_serve.engines.sglang.runner import engine_args
from fmbc_serve.serve import DEFAULT_MODEL

if __name__ == "__main__":  # SGLang spawns its scheduler process
    engine = sgl.Engine(**engine_args(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_MODEL, kv_tokens=4096))
    prompts = ["In the beginning", "And the LORD spake unto Moses, saying,", "Blessed are the"]
    for prompt, out in zip(prompts, engine.generate(prompts, {"temperature": 0, "max_new_tokens": 24}), strict=True):
        print(f"{prompt!r} -> {out['text']!r}")
    engine.shutdown()
