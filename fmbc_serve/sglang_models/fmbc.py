"""Re-export for SGLang's package scan (see this package's docstring)."""

from fmbc_serve.engines.sglang.models.fmbc import EntryClass

__all__ = ["EntryClass"]
