"""The parts of scripts/serving_benchmark.py (which runs the rounds), one module per job:

- `checkpoints`: the shapes and the models' random checkpoints;
- `commands`: each engine's server command as the benchmark starts it;
- `client`: the engines' own benchmark clients, kept running in the engine's environment between measurements;
- `memory`: the servers' memory, sampled without disturbing them;
- `paired_statistics`: medians, spreads and the paired ratios against the noise floor;
- `report`: the printed tables and the plot.
"""
