"""`fmbc serve`: start a real engine's OpenAI-compatible server for an FMBC checkpoint.

A thin front over the engines' own servers, not a server of its own: it picks vLLM or SGLang (whichever is
installed, vLLM first, or `--engine`), adds the flags the machine needs (the CPU flags from docs/ on a machine
without CUDA), serves the embedded default model unless given a folder, passes every flag it does not know
itself through to the engine unchanged, and once `/health` answers prints the URL and a ready-to-paste curl.
It exits with the engine.

Given a checkpoint of the FMBC family that is not in our format (a published folder or hub id, with its own
code), it imports it first (`fmbc import`, with its proof) into a cache keyed by the source's content, and
serves the import; the next start with the same source reuses it without importing or proving again.

Safe defaults for a server anyone on the network could reach: it listens on 127.0.0.1 unless `--host` says
otherwise (the Docker images pass 0.0.0.0), `--api-key` (default: the FMBC_API_KEY environment variable) turns
on the engine's own API-key check, and Prometheus `/metrics` is on for both engines (SGLang needs
`--enable-metrics`, which SGLang's runner adds).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from .engines import ENGINES, runner

DEFAULT_MODEL = Path(__file__).parent / "default_model"
SERVED_NAME = "fmbc"
API_KEY_ENV = "FMBC_API_KEY"
IMPORT_CACHE_ENV = "FMBC_IMPORT_CACHE"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=str(DEFAULT_MODEL),
                   help="checkpoint folder (default: the embedded default model); a foreign FMBC-family folder or hub "
                        "id is imported first, once")
    p.add_argument("--engine", choices=["auto", *ENGINES], default="auto")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--served-model-name", default=SERVED_NAME, help="the `model` name clients send")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"clients must send `Authorization: Bearer KEY` (default: ${API_KEY_ENV}; unset: no check)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow running the checkpoint's own code: to import a foreign checkpoint, and in the engine "
                        "(a tokenizer with code of its own)")


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


def import_cache() -> Path:
    """Where imports of foreign checkpoints are kept: $FMBC_IMPORT_CACHE, else ~/.cache/fmbc-serve/imported."""
    return Path(os.environ.get(IMPORT_CACHE_ENV) or Path.home() / ".cache" / "fmbc-serve" / "imported")


def content_key(folder: Path) -> str:
    """A digest of every file of a checkpoint folder, names and bytes: a changed file, a new one or a removed one
    gives another key."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(folder).parts)):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def checkpoint_to_serve(src: str, trust_remote_code: bool) -> Path:
    """The folder to serve for SRC: SRC itself if it is an fmbc-serve checkpoint, else its import, made once into
    the cache (keyed by SRC's content; a hub id is first fetched to the Hugging Face cache, which keeps its
    revision) and reused while SRC is unchanged.

    Replicas share a cache (one folder, several processes or hosts): one import of a source runs at a time (a lock
    beside it; the others wait, then reuse it), and where a shared file system does not honour that lock the
    import that finishes second finds the first in place and reuses it. Staging folders left by an import that
    was killed midway are removed before the next one starts; they are never served."""
    from .importer import REPORT_FILE, ImportRefused, format_report, import_checkpoint
    from .importer.pipeline import staging_prefix

    folder = Path(src)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(src))
        except Exception as err:  # noqa: BLE001 (any hub or network failure: the user needs its message)
            raise FileNotFoundError(f"{src} is neither a checkpoint folder nor a model on a reachable hub "
                                    f"({type(err).__name__}: {err})") from err
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{src} is not a checkpoint folder (no config.json)")
    if json.loads((folder / "config.json").read_text()).get("model_type") == "fmbc":
        return folder
    imported = import_cache() / f"{folder.resolve().name}-{content_key(folder)}"
    imported.parent.mkdir(parents=True, exist_ok=True)
    with import_lock(imported, src):
        if (imported / REPORT_FILE).is_file():
            print(f"fmbc serve: {src} was imported before, unchanged since: reusing {imported}", flush=True)
            return imported
        for leftover in imported.parent.glob(staging_prefix(imported) + "*"):
            shutil.rmtree(leftover, ignore_errors=True)
        print(f"fmbc serve: {src} is not in fmbc-serve's format: importing it into {imported} (once)", flush=True)
        try:
            print(format_report(import_checkpoint(str(folder), imported, trust_remote_code=trust_remote_code)),
                  flush=True)
        except ImportRefused:
            if not (imported / REPORT_FILE).is_file():
                raise
            print(f"fmbc serve: another process imported {src} meanwhile: reusing {imported}", flush=True)
    return imported


@contextlib.contextmanager
def import_lock(imported: Path, src: str) -> Iterator[None]:
    """Hold the lock on one cache entry's import (a file beside it, opened read-only so that a replica running as
    another user can take it too), saying so when another process holds it."""
    fd = os.open(imported.parent / f"{imported.name}.lock", os.O_RDONLY | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"fmbc serve: another process is importing {src} into {imported}: waiting for it", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def engine_command(args: argparse.Namespace, cuda: bool) -> tuple[str, list[str], dict[str, str]]:
    """(engine, the engine server's command, its extra environment) for parsed `fmbc serve` arguments."""
    engine = pick_engine(args.engine)
    model = checkpoint_to_serve(args.model, args.trust_remote_code)
    ours = ["--api-key", args.api_key] if args.api_key else []
    if args.trust_remote_code:
        ours.append("--trust-remote-code")
    command, env = runner(engine).server_command(str(model), args.host, args.port, args.served_model_name, cuda,
                                                 engine_args=ours + args.engine_args)
    return engine, command, env


def serve(args: argparse.Namespace) -> int:
    import torch

    engine, command, env = engine_command(args, torch.cuda.is_available())
    shown = shlex.join(command).replace(args.api_key, "***") if args.api_key else shlex.join(command)
    print(f"fmbc serve: starting {engine}: {shown}", flush=True)
    proc = subprocess.Popen(command, env={**os.environ, **env})
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    if "--headless" in args.engine_args:
        print(f"fmbc serve: {engine} runs headless (this host computes for the head's server and answers no HTTP); "
              "it exits with the engine", flush=True)
        return proc.wait()
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
