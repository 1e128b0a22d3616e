"""What `fmbc import` found and proved: written to DIR/import_report.json and printed as a table."""

from __future__ import annotations

from dataclasses import dataclass, field

REPORT_FILE = "import_report.json"


@dataclass
class Recognised:
    """What `fmbc import` found (written to DIR/import_report.json): the config fields, a note on the code, the
    attention conventions (`Attention` as a dict), the norm and activation, foreign module -> ours, and the
    proof's figures."""

    source: str
    config: dict
    code: str
    attention: dict
    norm: dict
    activation: str
    names: dict[str, str]
    facts: dict[str, str] = field(default_factory=dict)  # config field -> where it came from, where not plain
    proof: dict = field(default_factory=dict)


def format_report(recognised: Recognised) -> str:
    """The table `fmbc import` prints: what was recognised and the proof's figures."""
    c = recognised.config
    code = (f"{c['input_mode']}: learned table" if c["input_mode"] == "learned" else
            f"{c['input_mode']}: order={c['code_bit_order']} values={c['code_values']} scale={c['code_scale']:g} "
            f"layout={c['code_layout']}" + (f" A={c['affine_rows']} b={c['affine_bias']}" if "affine_rows" in c
                                             else ""))
    a = recognised.attention
    fused = f", fused qkv order {a['fused_order']}" if a["fused_order"] else ""
    rows = [("input code", f"{code} ({recognised.code})"),
            ("shape", f"V={c['vocab_size']} d={c['hidden_size']} layers={c['num_hidden_layers']} heads={a['heads']} "
                      f"MLP={c['intermediate_size']} context={c['max_position_embeddings']}"),
            ("rotary", f"{a['rotary']} pairs, theta={a['theta']:g}, rotary_dim={a['rotary_dim']} of "
                       f"{c['hidden_size'] // a['heads']}{fused}"),
            ("norm / activation", f"{recognised.norm['type']} eps={recognised.norm['eps']:g} / "
                                  f"{recognised.activation}"),
            ("biases", f"attention={c['attention_bias']} mlp={c['mlp_bias']}")]
    rows += [(f"{fact} from", source) for fact, source in recognised.facts.items()]
    rows += [(f"name {theirs}", ours) for theirs, ours in recognised.names.items()]
    rows += [(f"proof {k}", str(v)) for k, v in recognised.proof.items()]
    return "\n".join(f"{k:<44} {v}" for k, v in rows)


def provenance(recognised: Recognised) -> str:
    """The README.md of an imported folder: where it came from, what it is, and what the proof showed."""
    import datetime

    c, proof = recognised.config, recognised.proof
    return (f"# Imported by fmbc-serve\n\n"
            f"Converted from `{recognised.source}` by `fmbc import` on "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, and proven to compute the same "
            f"model (float32):\n\n"
            f"- input: {recognised.code}; {proof['input_code']} on all {proof['input_ids_checked']:,} ids\n"
            f"- every block within {proof['max_block_error']:.1e} of the source's (relative to what the block "
            f"adds; tolerance {proof['tolerances']['block']:g}) on sequences of {proof['sequence_lengths']} "
            f"tokens\n"
            f"- logits: max |Δ| {proof['max_abs_delta_logit']:.1e} (tolerance {proof['tolerances']['logit']:g})\n"
            f"- greedy continuations: {proof['greedy_continuations']}\n\n"
            f"Shape: V = {c['vocab_size']:,}, d = {c['hidden_size']}, {c['num_hidden_layers']} layers, "
            f"{recognised.attention['heads']} heads, {c['block_style']} blocks, context "
            f"{c['max_position_embeddings']}; weights in {proof['written_dtype']}. Everything recognised, and "
            f"the source's module names: `import_report.json`. Serve it with `fmbc serve DIR` or any engine "
            f"command of fmbc-serve's README.\n")
