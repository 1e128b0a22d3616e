"""The foreign checkpoint: loading it as transformers does, and running it (its logits, what a module receives).

Its code is someone else's: nothing here assumes a signature beyond `model(ids)`, and every output form
(HF outputs, `(logits, ...)` tuples, a bare tensor) is accepted.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..configuration_fmbc import FMBCConfig
from .errors import ImportRefused


def load_foreign(src: str, trust_remote_code: bool) -> tuple[nn.Module, object]:
    """The foreign model (upcast to fp32, eval) and tokenizer, as `AutoModelForCausalLM` / `AutoTokenizer` load
    them: safetensors, single or sharded with an index, or a `pytorch_model.bin`, which is unpickled with
    `weights_only=True` (tensors only: a pickle from a hub runs no code here)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_path = Path(src) / "config.json"
    if Path(src).is_dir():
        if not config_path.is_file():
            raise ImportRefused(f"{src} has no config.json: not a Hugging Face checkpoint folder")
        raw = json.loads(config_path.read_text())
        if raw.get("model_type") == FMBCConfig.model_type:
            raise ImportRefused(f"{src} is already an fmbc-serve checkpoint: serve it directly (fmbc serve {src})")
        if raw.get("auto_map") and not trust_remote_code:
            files = sorted({ref.split(".")[0] + ".py" for ref in auto_map_refs(raw["auto_map"])})
            raise ImportRefused(
                f"{src} ships its own model code ({', '.join(files)}); importing must run it, to observe the "
                "input code its first block receives and to prove the conversion against it. Read that code, "
                "then pass --trust-remote-code to allow it")
    try:
        model = AutoModelForCausalLM.from_pretrained(src, trust_remote_code=trust_remote_code, dtype=torch.float32,
                                                     weights_only=True)
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 (foreign code can raise anything; the user needs its message)
        raise ImportRefused(f"{src} does not load with transformers (trust_remote_code={trust_remote_code}): "
                            f"{type(err).__name__}: {err}") from err
    return model.float().eval(), tokenizer


def stored_dtype(src: str, model: nn.Module) -> torch.dtype:
    """The floating-point dtype the source stores its weights in (the most common among its tensors), read from
    the safetensors headers or the memory-mapped pickles of a folder, else from the config."""
    from ..weights import SAFETENSORS_DTYPES

    counts: dict[torch.dtype, int] = {}
    folder = Path(src)
    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                dtype = SAFETENSORS_DTYPES[f.get_slice(name).get_dtype()]
                counts[dtype] = counts.get(dtype, 0) + 1
    for path in sorted(folder.glob("pytorch_model*.bin")) if folder.is_dir() and not counts else []:
        for tensor in torch.load(path, mmap=True, weights_only=True, map_location="cpu").values():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + 1
    floats = {dtype: n for dtype, n in counts.items() if dtype.is_floating_point}
    if floats:
        return max(floats, key=floats.get)
    configured = getattr(model.config, "dtype", None)
    if isinstance(configured, str):
        configured = getattr(torch, configured, None)
    return configured if isinstance(configured, torch.dtype) else torch.float32


def auto_map_refs(auto_map: dict) -> Iterator[str]:
    """Every `module.Class` reference of a config's or tokenizer's auto_map."""
    for ref in auto_map.values():
        yield from ([ref] if isinstance(ref, str) else [r for r in ref if r])


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T', V] of a causal LM called as `model(ids)`: HF outputs, (logits, ...) tuples or a tensor.
    Models that return only the last position's logits (nanoGPT) give T' = 1."""
    out = model(ids)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


class _Stop(Exception):
    """Raised by a watcher to end a forward pass early, once what it watches has been seen."""


Watcher = tuple[nn.Module, Callable[[Any], object]]


def run_watching(model: nn.Module, ids: torch.Tensor, inputs: Sequence[Watcher] = (),
                 outputs: Sequence[Watcher] = ()) -> torch.Tensor | None:
    """The logits of `model(ids)` (no grad), each watcher's callback given, on every call of its module, the
    tensor the module is called with (`inputs`: the first positional argument, else the first tensor keyword) or
    what it returns (`outputs`). None when a callback ended the pass early (`_Stop`). The hooks go whatever the
    foreign code raises."""
    def entering(see: Callable[[Any], object]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            see(args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor)))
        return hook

    def leaving(see: Callable[[Any], object]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            see(output)
        return hook

    handles = [m.register_forward_pre_hook(entering(see), with_kwargs=True) for m, see in inputs]
    handles += [m.register_forward_hook(leaving(see), with_kwargs=True) for m, see in outputs]
    try:
        with torch.no_grad():
            return logits_of(model, ids)
    except _Stop:
        return None
    finally:
        for handle in handles:
            handle.remove()


def observe_stream(model: nn.Module, modules: list[nn.Module], ids: torch.Tensor,
                   stop_after_first: bool = False) -> list[torch.Tensor]:
    """The tensor entering each of `modules` (the residual stream, for blocks and the final norm) when the
    model runs on `ids` [B, T], in float32. `stop_after_first` aborts the forward once the first is seen."""
    return streams_and_logits(model, modules, ids, stop_after_first)[0]


def streams_and_logits(model: nn.Module, modules: list[nn.Module], ids: torch.Tensor, stop_after_first: bool = False
                       ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """`observe_stream`'s streams and the logits of the same forward pass (None when it was stopped)."""
    streams: list[torch.Tensor] = []

    def record(hidden: torch.Tensor) -> None:
        streams.append(hidden.detach().float())
        if stop_after_first:
            raise _Stop

    logits = run_watching(model, ids, inputs=[(m, record) for m in modules])
    return streams, None if logits is None else logits.float()


def observe_inputs(model: nn.Module, first_block: nn.Module, vocab: int, progress: bool = False,
                   chunk: int = 4096) -> torch.Tensor:
    """The first block's input for every id as a one-token sequence: [V, d], the foreign model's input code
    (whether a stored table or computed in `forward`)."""
    from tqdm import tqdm

    rows = []
    for start in tqdm(range(0, vocab, chunk), desc="observing the input of every id", disable=not progress):
        ids = torch.arange(start, min(vocab, start + chunk)).unsqueeze(1)
        rows.append(observe_stream(model, [first_block], ids, stop_after_first=True)[0][:, 0])
    return torch.cat(rows)


def copy_tokenizer_code(src: str, out: Path) -> None:
    """A tokenizer with code of its own keeps it: copy the modules its saved `auto_map` names from SRC."""
    saved = out / "tokenizer_config.json"
    auto_map = json.loads(saved.read_text()).get("auto_map") if saved.is_file() else None
    if auto_map and Path(src).is_dir():
        for module in {ref.rpartition("--")[2].split(".")[0] for ref in auto_map_refs(auto_map)}:
            shutil.copyfile(Path(src) / f"{module}.py", out / f"{module}.py")
