"""The benchmark plot: live latency alone and under a bulk run, and where a batched turn's time goes."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any


def plot(results: dict[str, Any], path: Path) -> Path:
    """Draw bench/throughput.png from the engine and generation figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = results["engine"]["live_latency"]
    gen = results["generation"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    cases = [
        ("alone", live["alone_s"]),
        (f"during a {live['bulk_turns']}-turn bulk run", live["under_load_s"]),
    ]
    for x, (_, seconds) in enumerate(cases):
        left.scatter([x] * len(seconds), seconds, color="tab:blue", alpha=0.7, zorder=3)
        median = statistics.median(seconds)
        left.hlines(median, x - 0.2, x + 0.2, color="tab:red", zorder=4)
        left.text(x + 0.22, median, f"median {median:.1f} s", va="center", fontsize=8)
    left.set_xticks(range(len(cases)), [name for name, _ in cases])
    left.set_xlim(-0.5, len(cases) - 0.2)
    left.set_ylim(bottom=0)
    left.set_ylabel("live turn latency, s (enqueued → stored)")
    left.set_title(f"Live turns: {live['ratio']}× slower under load (target ≤ {live['target']}×)")
    left.grid(alpha=0.3, axis="y")

    stages = gen["stage_ms_per_turn"]
    names = list(stages)[::-1]
    right.barh(names, [max(stages[n], 0.01) for n in names], color="tab:orange")
    right.set_xscale("log")
    for y, name in enumerate(names):
        right.text(max(stages[name], 0.01), y, f" {stages[name]:.2f}", va="center", fontsize=8)
    right.set_xlabel("ms per turn (log scale)")
    right.set_title(f"Where a turn's time goes at batch {gen['batch_size']}")
    where = gen.get("machine", {})
    fig.suptitle(
        f"mlchat · {gen['model']} · {where.get('gpu') or where.get('cpu_model') or where.get('cpu', '')}"
        f" · {where.get('cores', '?')} cores",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
