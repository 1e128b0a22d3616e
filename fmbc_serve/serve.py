"""`fmbc serve`: start a real engine's OpenAI-compatible server for an FMBC checkpoint.

A thin front over the engines' own servers, not a server of its own: it picks vLLM or SGLang (whichever is
installed, vLLM first, or `--engine`), adds the flags the machine needs (the CPU flags from docs/ on a machine
without CUDA), serves the embedded default model unless given a folder, passes every flag it does not know
itself through to the engine unchanged, and once `/health` answers prints the URL and a ready-to-paste curl.
It exits with the engine.

Safe defaults for a server anyone on the network could reach: it listens on 127.0.0.1 unless `--host` says
otherwise (the Docker images pass 0.0.0.0), `--api-key` (default: the FMBC_API_KEY environment variable) turns
on the engine's own API-key check, and Prometheus `/metrics` is on for both engines (SGLang needs
`--enable-metrics`, which SGLang's runner adds).
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
API_KEY_ENV = "FMBC_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL),
                   help="checkpoint folder (default: the embedded default model)")
    p.add_argument("--engine", choices=["auto", *ENGINES], default="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--served-model-name", default=SERVED_NAME, help="the `model` name clients send")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"clients must send `Authorization: Bearer KEY` (default: ${API_KEY_ENV}; unset: no check)")


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


def split_engine_args(args: argparse.Namespace, unknown: list[str], argv: list[str]) -> list[str]:
    """The engine's own flags among the arguments `fmbc serve` does not know. argparse reads the value of an
    engine flag given before any folder (`fmbc serve --dtype float32`) as the folder: that value goes back
    after its flag, and the folder is the default one."""
    engine_args = [arg for arg in unknown if arg != "--"]
    if args.model in argv and args.model != str(DEFAULT_MODEL):
        position = argv.index(args.model)
        if position > 0 and argv[position - 1] in engine_args:
            engine_args.insert(engine_args.index(argv[position - 1]) + 1, args.model)
            args.model = str(DEFAULT_MODEL)
    return engine_args


def engine_command(args: argparse.Namespace, cuda: bool) -> tuple[str, list[str], dict[str, str]]:
    """(engine, the engine server's command, its extra environment) for parsed `fmbc serve` arguments."""
    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"{model} is not a checkpoint folder (no config.json)")
    engine = pick_engine(args.engine)
    command, env = runner(engine).server_command(str(model), args.host, args.port, args.served_model_name, cuda)
    if args.api_key:
        command += ["--api-key", args.api_key]
    return engine, command + args.engine_args, env


def serve(args: argparse.Namespace) -> int:
    import torch

    engine, command, env = engine_command(args, torch.cuda.is_available())
    shown = shlex.join(command).replace(args.api_key, "***") if args.api_key else shlex.join(command)
    print(f"fmbc serve: starting {engine}: {shown}", flush=True)
    proc = subprocess.Popen(command, env={**os.environ, **env})
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    local = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
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
    auth = f" -H \"Authorization: Bearer ${API_KEY_ENV}\"" if args.api_key else ""
    print(f"\nfmbc serve: {engine} is ready after {time.monotonic() - start:.0f} s at {local}/v1 "
          f"(model name {args.served_model_name!r}; Prometheus metrics at {local}/metrics). Try:\n"
          f"  curl {local}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'\n", flush=True)
    return proc.wait()
