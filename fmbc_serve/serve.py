"""`fmbc serve`: start a real engine's OpenAI-compatible server for an FMBC checkpoint.

A thin front over the engines' own servers, not a server of its own: it picks vLLM or SGLang (whichever is
installed, vLLM first, or `--engine`), adds the flags the machine needs (the CPU flags from docs/ on a machine
without CUDA), serves the embedded default model unless given a folder, passes every flag it does not know
itself through to the engine unchanged, and once `/health` answers prints the URL and a ready-to-paste curl.
It exits with the engine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .engines import ENGINES, runner

DEFAULT_MODEL = Path(__file__).parent / "default_model"
SERVED_NAME = "fmbc"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL),
                   help="checkpoint folder (default: the embedded default model)")
    p.add_argument("--engine", choices=["auto", *ENGINES], default="auto")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--served-model-name", default=SERVED_NAME, help="the `model` name clients send")


def pick_engine(choice: str) -> str:
    installed = [name for name in ENGINES if importlib.util.find_spec(name) is not None]
    if choice == "auto":
        if not installed:
            raise RuntimeError("neither vLLM nor SGLang is installed in this Python; "
                               "install one (see README: bash scripts/serve.sh sets one up)")
        return installed[0]
    if choice not in installed:
        raise RuntimeError(f"--engine {choice}: {choice} is not installed in this Python ({sys.executable})")
    return choice


def serve(args: argparse.Namespace) -> int:
    import torch

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a checkpoint folder (no config.json)")
    engine = pick_engine(args.engine)
    extra = [arg for arg in args.engine_args if arg != "--"]
    command, env = runner(engine).server_command(str(model), args.host, args.port, args.served_model_name,
                                                 torch.cuda.is_available())
    command += extra
    print(f"fmbc serve: starting {engine}: {shlex.join(command)}", flush=True)
    proc = subprocess.Popen(command, env={**os.environ, **env})
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    local = f"http://127.0.0.1:{args.port}"
    start = time.monotonic()
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(local + "/health", timeout=5) as reply:
                if reply.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        return proc.returncode
    body = json.dumps({"model": args.served_model_name, "prompt": "And God said,", "max_tokens": 32})
    print(f"\nfmbc serve: {engine} is ready after {time.monotonic() - start:.0f} s at {local}/v1 "
          f"(model name {args.served_model_name!r}). Try:\n"
          f"  curl {local}/v1/completions -H 'Content-Type: application/json' -d '{body}'\n", flush=True)
    return proc.wait()
