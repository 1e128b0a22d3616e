"""vLLM: `plugin.register` (entry point `vllm.general_plugins`), `model.FMBCForCausalLM`, `runner` (offline
greedy decoding and the OpenAI server command)."""
