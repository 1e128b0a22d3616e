"""`fmbc`: create, inspect and run FMBC checkpoints.

    fmbc init --preset tiny --out DIR [--seed N] [--dtype float32|bfloat16|float16] [--input-mode MODE]
    fmbc inspect DIR
    fmbc generate DIR "prompt" [--max-new-tokens N] [--greedy]
    fmbc parity DIR --engine vllm|sglang [--max-new-tokens N] [--tolerance T] [--prompt TEXT ...]
    fmbc train --data FILE --out DIR [--input-mode binary|affine|learned] [--steps N] [--resume] ...
    fmbc import SRC --out DIR [--trust-remote-code] [--set FIELD=VALUE ...] [--dtype auto|float32|bfloat16|float16]
    fmbc serve [DIR|SRC] [--engine auto|vllm|sglang] [--host 127.0.0.1] [--port 30000] [--api-key KEY]
               [--trust-remote-code] [ENGINE FLAGS...]
    fmbc quantize DIR --out DIR [--scheme W8A8|W4A16]
    fmbc export DIR --to gguf --out FILE [--outtype f32|f16|bf16|q8_0]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CommandError(Exception):
    """A problem with the user's input: printed as `fmbc: error: ...` with exit status 2, no traceback."""


def user_errors() -> tuple[type[Exception], ...]:
    """The errors that mean bad input, not a bug: each is printed as one line (exit status 2). Anything else keeps
    its traceback, so a bug inside fmbc-serve never reads like the user's mistake."""
    from .configuration_fmbc import ConfigError
    from .gguf_export import ExportRefused
    from .importer import ImportRefused
    from .weights import CheckpointError

    return CommandError, ConfigError, CheckpointError, ImportRefused, ExportRefused, FileNotFoundError


def cmd_init(args: argparse.Namespace) -> int:
    from .checkpoint import init_checkpoint, inspect_checkpoint, make_config

    overrides = {} if args.input_mode is None else {"input_mode": args.input_mode}
    config = make_config(args.preset, **overrides)
    init_checkpoint(config, args.out, seed=args.seed, dtype=DTYPES[args.dtype], progress=True)
    report = inspect_checkpoint(args.out)
    print(f"wrote {args.out}: preset {args.preset}, input_mode {config.input_mode}, "
          f"{report.total_params:,} parameters ({report.input_params:,} input-embedding)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .checkpoint import inspect_checkpoint

    report = inspect_checkpoint(args.dir)
    c = report.config
    print(f"checkpoint          {args.dir}")
    print(f"input_mode          {c.input_mode}")
    print(f"vocab_size (V)      {c.vocab_size}  (K = {c.num_code_bits} bits)")
    if c.input_mode != "learned":
        print(f"code                order={c.code_bit_order} values={c.code_values} scale={c.code_scale} "
              f"layout={c.code_layout}" + (f" affine_bias={c.affine_bias}" if c.input_mode == "affine" else ""))
    print(f"width / layers      {c.hidden_size} / {c.num_hidden_layers}  "
          f"({c.num_attention_heads} heads of {c.head_dim}, MLP {c.intermediate_size}, {c.hidden_act})")
    print(f"norm / rope         {c.norm_type} eps={c.norm_eps} / theta={c.rope_theta} "
          f"partial_rotary_factor={c.partial_rotary_factor}")
    print(f"context             {c.max_position_embeddings}")
    print(f"tensor dtypes       {', '.join(f'{k}×{v}' for k, v in sorted(report.dtypes.items()))}")
    if quantization := getattr(c, "quantization_config", None):
        print(f"quantization        {quantization.get('quant_method', '?')} {quantization.get('format', '')}: "
              f"{len(report.quantized)} layers quantized")
    print(f"parameters: input-embedding {report.input_params:,}")
    print(f"            blocks          {report.block_params:,}")
    print(f"            output head     {report.head_params:,}")
    print(f"            total           {report.total_params:,}")
    if report.problems:
        for problem in report.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    print("tensors             ok (all present, none unexpected, shapes match the config"
          + (", quantized layers' shapes are the engine's to check)" if report.quantized else ")"))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .checkpoint import load_config
    from .modeling_fmbc import FMBCForCausalLM

    load_config(args.dir)  # names a folder that is no FMBC checkpoint before transformers does
    tokenizer = AutoTokenizer.from_pretrained(args.dir)
    model = FMBCForCausalLM.from_pretrained(args.dir, dtype=torch.float32).eval()
    inputs = tokenizer(args.prompt, return_tensors="pt")
    room = model.config.max_position_embeddings - inputs.input_ids.shape[1]
    if room < args.max_new_tokens:
        raise CommandError(f"prompt of {inputs.input_ids.shape[1]} tokens + --max-new-tokens {args.max_new_tokens} "
                           f"exceeds the context length {model.config.max_position_embeddings}")
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=not args.greedy,
                             temperature=None if args.greedy else args.temperature, top_p=None, top_k=None)
    print(args.prompt + tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .checkpoint import load_config
    from .parity import DEFAULT_PROMPTS, run_parity

    load_config(args.dir)
    tokenizer = AutoTokenizer.from_pretrained(args.dir)
    texts = args.prompt or list(DEFAULT_PROMPTS)
    prompts = [tokenizer(text)["input_ids"] for text in texts]
    rows = run_parity(args.dir, args.engine, prompts, args.max_new_tokens)
    print(f"{'prompt':<40} {'tokens':>6} {'greedy':>8} {'max|Δlogprob| decode':>21} {'prefill':>10}")
    for text, row in zip(texts, rows, strict=True):
        label = text.replace("\n", "\\n")[:38]
        greedy = "equal" if row.agree else f"differs@{row.first_divergence}"
        print(f"{label:<40} {row.prompt_tokens:>6} {greedy:>8} {row.max_decode_delta:>21.3e} "
              f"{row.max_prefill_delta:>10.3e}")
    worst = max(row.max_delta for row in rows)
    ok = all(row.agree for row in rows) and worst <= args.tolerance
    print(f"{args.engine}: greedy tokens {'all equal' if all(r.agree for r in rows) else 'DIFFER'}, "
          f"max |Δlogprob| {worst:.3e} (tolerance {args.tolerance:g}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    record = train(args)
    print(f"wrote {args.out}: step {record['step']}, held-out loss {record['held_out_loss']} "
          f"(perplexity {record['held_out_perplexity']})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .importer import format_report, import_checkpoint
    from .importer.facts import parse_overrides

    recognised = import_checkpoint(args.src, args.out, trust_remote_code=args.trust_remote_code,
                                   overrides=parse_overrides(args.set), dtype=DTYPES.get(args.dtype))
    print(format_report(recognised))
    print(f"wrote {args.out}: proven equal to {args.src} (max |Δlogit| "
          f"{recognised.proof['max_abs_delta_logit']:.2e}); serve it with: fmbc serve {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    try:
        return serve(args)
    except RuntimeError as err:
        raise CommandError(str(err)) from err


def cmd_quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize_checkpoint

    try:
        quantize_checkpoint(args.dir, args.out, args.scheme)
    except ModuleNotFoundError as err:
        raise CommandError(str(err)) from err
    print(f"wrote {args.out}: {args.scheme} (compressed-tensors, by llm-compressor), lm_head kept in full precision")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .gguf_export import export_gguf

    try:
        summary = export_gguf(args.dir, args.out, args.outtype)
    except ModuleNotFoundError as err:
        raise CommandError(f"{err}: install fmbc-serve[gguf]") from err
    print(f"wrote {summary['file']} ({summary['bytes']:,} bytes, {args.outtype}): llama.cpp's gptneox, token "
          f"embedding {summary['token_embedding']}, tokenizer {summary['tokenizer']}; tensors by type "
          f"{summary['tensors']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .checkpoint import PRESETS
    from .configuration_fmbc import INPUT_MODES
    from .engines import ENGINES
    from .tolerances import FP32_PARITY

    parser = argparse.ArgumentParser(prog="fmbc", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a randomly initialised checkpoint")
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--input-mode", choices=INPUT_MODES, help="override the preset's input mode")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("inspect", help="summarise a checkpoint and check its tensors against its config")
    p.add_argument("dir")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("generate", help="generate with the reference model on CPU")
    p.add_argument("dir")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--greedy", action="store_true", help="greedy decoding (default: sampling)")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("parity", help="check that an engine computes the same model as the reference")
    p.add_argument("dir")
    p.add_argument("--engine", required=True, choices=ENGINES)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--tolerance", type=float, default=FP32_PARITY,
                   help="largest accepted |Δlogprob| (float32 checkpoints; default %(default)g)")
    p.add_argument("--prompt", action="append", help="a prompt text (repeatable; default: a built-in set)")
    p.set_defaults(func=cmd_parity)

    from .train import add_arguments

    p = sub.add_parser("train", help="train an FMBC checkpoint (or its learned twin) on a text file")
    add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("import", help="convert a foreign FMBC-family checkpoint (its own code and names) to "
                                      "this format, proven equal on every id")
    p.add_argument("src", help="checkpoint folder (or hub id) that AutoModelForCausalLM.from_pretrained loads")
    p.add_argument("--out", required=True, help="new output folder")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow running the checkpoint's own Python code (needed when it ships any)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a fact you know, as a config field (max_position_embeddings=2048, rope_theta=500000, "
                        "norm_eps=1e-6, ...): replaces what would be inferred; the proof still checks it (repeatable)")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                   help="dtype of the written weights (default: the dtype the source stores them in)")
    p.set_defaults(func=cmd_import)

    from .serve import add_arguments as add_serve_arguments

    p = sub.add_parser("serve", help="start vLLM's or SGLang's OpenAI server for a checkpoint (default: embedded)")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    from .quantize import SCHEMES

    p = sub.add_parser("quantize", help="write a compressed-tensors quantized copy of a checkpoint with "
                                        "llm-compressor (its own environment: bash scripts/venv.sh quant)")
    p.add_argument("dir")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--scheme", choices=SCHEMES, default="W8A8")
    p.set_defaults(func=cmd_quantize)

    from .gguf_export import OUTTYPES

    p = sub.add_parser("export", help="write a checkpoint for another runtime: llama.cpp's GGUF (gptneox)")
    p.add_argument("dir")
    p.add_argument("--to", required=True, choices=["gguf"])
    p.add_argument("--out", required=True, help="the GGUF file to write (never overwritten)")
    p.add_argument("--outtype", choices=list(OUTTYPES), default="f32",
                   help="how weight matrices are stored (norms and biases stay f32)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "serve":
        from .serve import split_engine_args

        args.engine_args = split_engine_args(args, unknown, sys.argv[1:] if argv is None else argv)
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except user_errors() as err:
        parser.exit(2, f"fmbc {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
