"""What the rounds measured, summarised: each model's medians and spreads, and the paired throughput ratios with
the verdict against the noise floor."""

from __future__ import annotations

import statistics

from .client import METRICS

# The ratios the benchmark reports: FMBC against its learned twin, a stock architecture, and itself.
PAIRS = (("fmbc", "learned"), ("fmbc", "stock"), ("fmbc", "fmbc-transformers"), ("fmbc", "fmbc-again"))
NOISE_FLOOR = "fmbc/fmbc-again"


def spread(values: list[float]) -> dict:
    """Median, min, max and quartiles of a list of figures (the list itself kept)."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "q1": q1, "q3": q3,
            "n": len(values), "values": values}


def summarise(measurements: dict[str, dict[int, list[dict]]]) -> dict:
    """Per model and concurrency: each figure's median over rounds, and the throughput's spread."""
    return {model: {concurrency: {**{metric: statistics.median(r[metric] for r in rounds) for metric in METRICS},
                                  "throughput": spread([r["output_throughput"] for r in rounds])}
                    for concurrency, rounds in by_concurrency.items()}
            for model, by_concurrency in measurements.items()}


def paired_ratios(measurements: dict[str, dict[int, list[dict]]]) -> dict:
    """For each pair of PAIRS that was measured: per concurrency, the throughput ratio of every round (both from
    the same round) and their spread. Each ratio other than the noise floor says whether it is a claimed difference:
    its median outside the noise band at that concurrency (None without a noise floor). Which of two servers of one
    checkpoint is "again" is arbitrary, so the band holds each noise ratio and its inverse: a floor of 0.95..0.97
    means chance alone moved a ratio by up to 1/0.95, either way."""
    ratios: dict[str, dict[int, dict]] = {}
    for first, second in PAIRS:
        if first not in measurements or second not in measurements:
            continue
        by_concurrency = {}
        for concurrency, rounds in measurements[first].items():
            theirs = {r["round"]: r["output_throughput"] for r in measurements[second].get(concurrency, [])}
            values = [r["output_throughput"] / theirs[r["round"]] for r in rounds if r["round"] in theirs]
            if values:
                by_concurrency[concurrency] = spread(values)
        ratios[f"{first}/{second}"] = by_concurrency
    noise = ratios.get(NOISE_FLOOR, {})
    for name, by_concurrency in ratios.items():
        if name == NOISE_FLOOR:
            continue
        for concurrency, ratio in by_concurrency.items():
            floor = noise.get(concurrency)
            if floor is None:
                ratio["claimed"] = None
                continue
            low, high = ratio["noise_band"] = noise_band(floor)
            ratio["claimed"] = not low <= ratio["median"] <= high
    return ratios


def noise_band(floor: dict) -> list[float]:
    """The noise floor's min..max widened by their inverses (the floor's direction is arbitrary)."""
    return [min(floor["min"], 1 / floor["max"]), max(floor["max"], 1 / floor["min"])]
