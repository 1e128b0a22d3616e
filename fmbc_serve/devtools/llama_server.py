"""llama-cpp-python with llama.cpp's CPU extra buffer types (weight repacking) off, for `Llama` and for its OpenAI
server: with them on, llama-cpp-python 0.3.36 segfaults at the first q8_0 matrix multiply on an AVX-512/AMX CPU
(docs/without-plugin.md), and neither `Llama` nor the server has an option for it (llama.cpp's own CLI and server
have `--no-repack`). So the default model parameters that `Llama` starts from are changed while a model loads.
The server also answers a request whose `x-request-id` header is not a UUID with an empty HTTP 400 (its request-id
middleware validates the header), and vLLM's benchmark client sends `bench-...-N`: run as below, it takes any id.

    python -m fmbc_serve.devtools.llama_server --model FILE.gguf ...   # `python -m llama_cpp.server`, as above
"""

from __future__ import annotations

import contextlib
import runpy
from collections.abc import Iterator


@contextlib.contextmanager
def without_extra_buffers() -> Iterator[None]:
    """Within this block, every `llama_cpp.Llama` loads its weights without the extra buffer types."""
    from llama_cpp import llama as llama_module

    defaults = llama_module.llama_cpp.llama_model_default_params

    def params_without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = params_without_extra_buffers
    try:
        yield
    finally:
        llama_module.llama_cpp.llama_model_default_params = defaults


def accept_any_request_id() -> None:
    """The server's request-id middleware without its UUID check."""
    from llama_cpp.server import app
    from starlette_context.plugins import RequestIdPlugin

    app.RequestIdPlugin = lambda: RequestIdPlugin(validate=False)


if __name__ == "__main__":
    accept_any_request_id()
    with without_extra_buffers():
        runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
