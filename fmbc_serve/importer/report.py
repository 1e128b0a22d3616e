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
    rows += [(f"name {theirs}", ours) for theirs, ours in recognised.names.items()]
    rows += [(f"proof {k}", str(v)) for k, v in recognised.proof.items()]
    return "\n".join(f"{k:<44} {v}" for k, v in rows)
