"""The benchmark's printed tables and its plot."""

from __future__ import annotations

from pathlib import Path

from .paired_statistics import NOISE_FLOOR, noise_band


def print_tables(engine: str, result: dict) -> None:
    """Servers, throughput and latency per model, and the paired ratios against the noise floor."""
    print(f"\n{engine}: servers (load = start to healthy; memory of the server's process tree)")
    for model, server in result["servers"].items():
        if "load_s" in server:
            print(f"  {model:<10} load {server['load_s']:6.1f} s  peak RSS {server.get('peak_rss_gib', 0):.2f} GiB"
                  f"  PSS after the rounds {server.get('idle_pss_gib', 0):.2f} GiB")
        if "error" in server:
            print(f"  {model:<10} FAILED: {server['error']}")
    print(f"{engine}: output tok/s median [min..max] over rounds, TTFT p50/p99 ms, ITL p50/p99 ms")
    for model, by_concurrency in result["summary"].items():
        for concurrency, s in by_concurrency.items():
            tput = s["throughput"]
            print(f"  {model:<10} c={concurrency:<3} {tput['median']:8.1f} [{tput['min']:.1f}..{tput['max']:.1f}]"
                  f"  TTFT {s['median_ttft_ms']:.1f}/{s['p99_ttft_ms']:.1f}  ITL {s['median_itl_ms']:.1f}/"
                  f"{s['p99_itl_ms']:.1f}")
    if result["ratios"]:
        print(f"{engine}: throughput ratio per round, median [min..max]; noise floor = {NOISE_FLOOR}")
    for name, by_concurrency in result["ratios"].items():
        for concurrency, ratio in by_concurrency.items():
            verdict = "" if ratio.get("claimed") is None else (
                f"  {'claimed: outside' if ratio['claimed'] else 'within'} the noise band "
                f"{ratio['noise_band'][0]:.3f}..{ratio['noise_band'][1]:.3f}")
            print(f"  {name:<16} c={concurrency:<3} {ratio['median']:.3f} [{ratio['min']:.3f}..{ratio['max']:.3f}]"
                  f"  rounds " + " ".join(f"{v:.2f}" for v in ratio["values"]) + verdict)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    """Per engine: the per-round ratios (points) and their medians against the noise floor's band, the throughput
    (median, bars min..max), and TTFT / ITL p50."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 3, figsize=(16, 4.4 * len(results)), squeeze=False)
    for row, (engine, result) in enumerate(results.items()):
        ratio_axis, throughput_axis, latency_axis = axes[row]
        noise = result["ratios"].get(NOISE_FLOOR, {})
        if noise:
            bands = [noise_band(floor) for floor in noise.values()]
            ratio_axis.fill_between(list(noise), [b[0] for b in bands], [b[1] for b in bands], color="grey",
                                    alpha=0.25, label=f"noise band ({NOISE_FLOOR} min..max and inverses)")
        for offset, (name, by_concurrency) in enumerate(result["ratios"].items()):
            shift = 2 ** (0.06 * (offset - 1))  # side by side, not on top of each other
            line = ratio_axis.plot([c * shift for c in by_concurrency], [r["median"] for r in by_concurrency.values()],
                                   marker="D", color="grey" if name == NOISE_FLOOR else None, label=f"{name} median")[0]
            for concurrency, ratio in by_concurrency.items():
                ratio_axis.scatter([concurrency * shift] * ratio["n"], ratio["values"], s=12, alpha=0.6,
                                   color=line.get_color())
        ratio_axis.axhline(1.0, color="black", linewidth=0.8)
        for model, by_concurrency in result["summary"].items():
            spreads = [s["throughput"] for s in by_concurrency.values()]
            medians = [s["median"] for s in spreads]
            error_bars = [[m - s["min"] for m, s in zip(medians, spreads, strict=True)],
                          [s["max"] - m for m, s in zip(medians, spreads, strict=True)]]
            throughput_axis.errorbar(list(by_concurrency), medians, yerr=error_bars, marker="o", capsize=3,
                                     label=model)
            line = latency_axis.plot(list(by_concurrency), [s["median_ttft_ms"] for s in by_concurrency.values()],
                                     marker="o", label=f"{model} TTFT")[0]
            latency_axis.plot(list(by_concurrency), [s["median_itl_ms"] for s in by_concurrency.values()], marker="x",
                              linestyle="--", color=line.get_color(), label=f"{model} ITL")
        levels = sorted({c for by_concurrency in result["summary"].values() for c in by_concurrency})
        for axis, label in ((ratio_axis, "throughput ratio, per round"), (throughput_axis, "output tokens/s"),
                            (latency_axis, "p50 latency (ms)")):
            axis.set_xscale("log", base=2)
            axis.set_xticks(levels, [str(c) for c in levels])
            axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            axis.set_xlabel("concurrent clients")
            axis.set_ylabel(label)
            axis.set_title(f"{engine}: {label}")
            axis.grid(True, alpha=0.3)
            if axis.get_legend_handles_labels()[0]:  # --quick leaves the ratio axis empty
                axis.legend(fontsize=7)
        latency_axis.set_yscale("log")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
