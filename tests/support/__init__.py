"""Helpers shared by the test files and by nothing else (those the scripts use too are in `fmbc_serve.devtools`).

- `servers`: the environment, flags and API key of the engine servers the suites start, and a client handle.
- `engines`: engine availability, scripts run in the engine's own Python, and the user-facing parity command.
- `checkpoints`: seeded code options, PEFT adapters and the parallel block styles the suites build checkpoints with.
- `bad_checkpoints`: checkpoints with one defect each, and the words the load policy refuses them with.
- `load`: a load generator of good and misconfigured clients (the router tests).
- `images`: what the Dockerfiles say, for the image and Kubernetes checks.
- `foreign`: only tests/unit/test_import.py's old name for `fmbc_serve.devtools.foreign`.
"""
