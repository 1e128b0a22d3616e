"""Helpers shared by the test suites (and the benchmark scripts, which put tests/ on sys.path).

- `servers`: start a real engine server on a free port and stop it after.
- `engines`: engine availability and the user-facing parity command.
- `checkpoints`: seeded code options and PEFT adapters the suites build checkpoints with.
- `foreign`: checkpoints written by someone else's code, for the importer.
- `images`: what the Dockerfiles say, for the image and Kubernetes checks.
"""
