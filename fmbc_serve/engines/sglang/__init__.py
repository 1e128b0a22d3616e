"""SGLang: `plugin.register` (entry point `sglang.srt.plugins`: the model class and the hooks of `validation`,
the request checks), `models/` (the package `SGLANG_EXTERNAL_MODEL_PACKAGE` scans), `runner` (offline greedy
decoding and the server command with the CPU flags)."""
