"""The `fmbc` console script, run as users run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

FMBC = str(Path(sys.executable).parent / "fmbc")


def run_fmbc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([FMBC, *args], capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def parameter_count(inspect_output: str, part: str) -> int:
    return int(re.search(rf"{part}\s+([\d,]+)", inspect_output).group(1).replace(",", ""))


@pytest.mark.slow
def test_paper_has_no_input_parameters_and_exactly_v_times_d_fewer(tmp_path: Path) -> None:
    counts = {}
    for preset in ("paper", "paper-learned"):
        run_fmbc("init", "--preset", preset, "--out", str(tmp_path / preset), "--dtype", "bfloat16")
        out = run_fmbc("inspect", str(tmp_path / preset)).stdout
        assert "tensors             ok" in out
        counts[preset] = (parameter_count(out, "input-embedding"), parameter_count(out, "total"))
    assert counts["paper"][0] == 0
    assert counts["paper-learned"][0] == 65536 * 1024
    assert counts["paper-learned"][1] - counts["paper"][1] == 67_108_864


def test_init_inspect_generate_tiny(tmp_path: Path) -> None:
    out_dir = tmp_path / "tiny"
    run_fmbc("init", "--preset", "tiny", "--out", str(out_dir), "--seed", "3")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "modeling_fmbc.py",
            "configuration_fmbc.py", "binary_code.py"} <= {p.name for p in out_dir.iterdir()}
    report = run_fmbc("inspect", str(out_dir)).stdout
    assert "input_mode          binary" in report and "K = 9 bits" in report
    first = run_fmbc("generate", str(out_dir), "Hello", "--max-new-tokens", "8", "--greedy").stdout
    again = run_fmbc("generate", str(out_dir), "Hello", "--max-new-tokens", "8", "--greedy").stdout
    assert first == again and first.startswith("Hello") and len(first.rstrip("\n")) > len("Hello")


def test_inspect_names_missing_extra_and_misshaped_tensors(tmp_path: Path) -> None:
    out_dir = tmp_path / "broken"
    run_fmbc("init", "--preset", "tiny", "--out", str(out_dir))
    weights = load_file(out_dir / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.0.self_attn.q_proj.weight"] = weights["model.layers.0.self_attn.q_proj.weight"][:64]
    weights["model.embed_tokens.weight"] = weights["lm_head.weight"].clone()
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    result = run_fmbc("inspect", str(out_dir), check=False)
    assert result.returncode == 1
    assert "missing tensor model.layers.1.mlp.up_proj.weight (expected shape [512, 128])" in result.stderr
    assert "unexpected tensor model.embed_tokens.weight" in result.stderr
    assert "tensor model.layers.0.self_attn.q_proj.weight has shape [64, 128], expected [128, 128]" in result.stderr


def test_cli_errors_are_clear(tmp_path: Path) -> None:
    result = run_fmbc("inspect", str(tmp_path / "nowhere"), check=False)
    assert result.returncode == 2 and "has no config.json" in result.stderr and "Traceback" not in result.stderr
    result = run_fmbc("init", "--preset", "huge", "--out", str(tmp_path / "x"), check=False)
    assert result.returncode == 2 and "invalid choice: 'huge'" in result.stderr
    run_fmbc("init", "--preset", "tiny", "--out", str(tmp_path / "t"))
    result = run_fmbc("generate", str(tmp_path / "t"), "Hi", "--max-new-tokens", "300", check=False)
    assert result.returncode == 2 and "exceeds the context length 256" in result.stderr


def test_known_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path: Path, monkeypatch, capsys) -> None:
    """A refusal or bad input exits 2 with one line; an error fmbc-serve did not expect is a bug and must show
    where it happened (a ValueError inside the importer must not read like the user's mistake)."""
    from fmbc_serve.cli import main
    from fmbc_serve.importer import pipeline

    run_fmbc("init", "--preset", "tiny", "--out", str(tmp_path / "t"))
    result = run_fmbc("import", str(tmp_path / "t"), "--out", str(tmp_path / "o"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("fmbc import: error:") and "already an fmbc-serve" in \
        result.stderr
    result = run_fmbc("generate", str(tmp_path / "nowhere"), "Hi", check=False)
    assert result.returncode == 2 and "has no config.json" in result.stderr and "Traceback" not in result.stderr

    def raise_internal_error(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(pipeline, "load_foreign", raise_internal_error)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        main(["import", str(tmp_path / "t"), "--out", str(tmp_path / "o")])


def serve_args(argv: list[str]):
    """`fmbc ARGV` parsed as `fmbc serve` parses it, without starting an engine."""
    from fmbc_serve.cli import build_parser
    from fmbc_serve.serve import split_engine_args

    args, unknown = build_parser().parse_known_args(argv)
    args.engine_args = split_engine_args(args, unknown, argv)
    return args


def test_serve_defaults_are_safe_and_engine_flags_pass_through(tmp_path: Path, monkeypatch) -> None:
    from fmbc_serve.serve import DEFAULT_MODEL

    monkeypatch.delenv("FMBC_API_KEY", raising=False)
    args = serve_args(["serve", "--dtype", "float32", "--enable-prefix-caching", "--max-num-batched-tokens", "64"])
    assert args.host == "127.0.0.1" and args.api_key is None and args.model == str(DEFAULT_MODEL)
    assert args.engine_args == ["--dtype", "float32", "--enable-prefix-caching", "--max-num-batched-tokens", "64"]
    args = serve_args(["serve", str(tmp_path), "--host", "0.0.0.0", "--max-model-len", "128"])
    assert args.model == str(tmp_path) and args.host == "0.0.0.0" and args.engine_args == ["--max-model-len", "128"]
    monkeypatch.setenv("FMBC_API_KEY", "from-env")
    from fmbc_serve.cli import build_parser

    assert build_parser().parse_known_args(["serve"])[0].api_key == "from-env"


def test_serve_starts_vllm_serve_with_every_flag_passed_through(tmp_path: Path, monkeypatch) -> None:
    """`fmbc serve` runs vLLM's own `vllm serve` CLI (through the launcher that makes the CPU build's CLI start),
    with our flags and the user's after the model, so that any `vllm serve` flag works through it."""
    from fmbc_serve.checkpoint import init_checkpoint, make_config
    from fmbc_serve.serve import engine_command

    model = init_checkpoint(make_config("tiny"), tmp_path / "m", seed=0)
    monkeypatch.setattr("fmbc_serve.serve.pick_engine", lambda choice: choice)  # no engine in the core's Python
    args = serve_args(["serve", str(model), "--engine", "vllm", "--api-key", "k", "--nnodes", "2",
                       "--node-rank", "1", "--headless"])
    engine, command, env = engine_command(args, cuda=False)
    assert engine == "vllm"
    assert command[1:5] == ["-m", "fmbc_serve.engines.vllm.cli", "serve", str(model)]
    assert command[-7:] == ["--api-key", "k", "--nnodes", "2", "--node-rank", "1", "--headless"]
    assert "VLLM_CPU_KVCACHE_SPACE" in env and "GLOO_SOCKET_IFNAME" not in env  # no head address: one host


@pytest.mark.parametrize("engine_args", [["--master-addr", "127.0.0.1"], ["--master_addr=127.0.0.1"],
                                         ["--data-parallel-address", "127.0.0.1"]])
def test_multi_host_network_settings_are_derived_from_the_route_to_the_head(engine_args, monkeypatch) -> None:
    """Across hosts gloo must announce the address the other host can reach, not 127.0.0.1 from the hostname:
    the interface and address this host reaches the head by (here the loopback, the only one a test may use)."""
    from fmbc_serve.engines.vllm.runner import multi_host_env

    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("VLLM_HOST_IP", raising=False)
    assert multi_host_env(engine_args) == {"VLLM_HOST_IP": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")  # the user's own setting is kept
    assert multi_host_env(engine_args) == {"VLLM_HOST_IP": "127.0.0.1"}
    assert multi_host_env(["--nnodes", "1"]) == {}
