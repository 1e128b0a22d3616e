"""Developer tools that the test suites and the scripts share, installed with the package so that they import
in every environment a test or a script runs in (the engines' included). Not part of the serving API.

- `servers`: start a real server as a subprocess on a free port, wait until it is healthy, stop it after.
- `kernel_inputs`: seeded ids and norm parameters for the fused code + norm kernel (its test and its benchmark).
- `foreign`: FMBC-family checkpoints written with someone else's code, for `fmbc import` (its tests and its
  benchmark).
- `serving_benchmark`: the parts of scripts/serving_benchmark.py, one module per job.
"""
