"""`fmbc import`: recognise a foreign checkpoint of the FMBC family, convert it, and prove nothing changed.

Published FMBC checkpoints ship their own modeling code and names we cannot know in advance, so nothing here
trusts a name alone. One module a job:
- `pipeline`: the import end to end (`recognise`, then `import_checkpoint` writes, proves and puts in place);
- `source`: load the foreign checkpoint as transformers does (weights as published) and run it, watching what
  its modules receive and return;
- `structure`: where it keeps each part (decoder stack, a block's norms and projections, block style from the
  data flow, final norm, head), found once and read by everything after;
- `code`: the input code, solved from what the first block receives for every id;
- `facts`: facts the config names under keys we do not know (the context length), and the user's `--set`;
- `probes`: norms and the activation, by calling the foreign modules;
- `attention`: head count, fused q/k/v order, rotary convention, base and fraction, by testing our block
  against the foreign one;
- `convert`: foreign tensors under our names, and the renaming for the report;
- `proof`: the written checkpoint against the source (input bitwise, block by block, norms, logits, greedy);
- `report`: what was found and proved (import_report.json, the printed table, the folder's README);
- `errors`: `ImportRefused`, the one refusal (the CLI shows it as one line, exit status 2).
Thresholds live in fmbc_serve/tolerances.py.
"""

from .errors import ImportRefused
from .pipeline import import_checkpoint, recognise
from .report import REPORT_FILE, Recognised, format_report

__all__ = ["REPORT_FILE", "ImportRefused", "Recognised", "format_report", "import_checkpoint", "recognise"]
