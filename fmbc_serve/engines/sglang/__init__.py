"""SGLang: `plugin.register` (entry point `sglang.srt.plugins`: model class and request validation),
`models/` (the package `SGLANG_EXTERNAL_MODEL_PACKAGE` scans), `runner` (offline greedy decoding and the
server command with the CPU flags)."""
