"""The benchmark plot: throughput by batch size, and where a batched turn's time goes."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot(results: dict[str, Any], path: Path) -> Path:
    """Draw bench/throughput.png from the generation figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = results["generation"]
    sizes = sorted(gen["throughput_by_batch_size"], key=int)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot([int(s) for s in sizes], [gen["throughput_by_batch_size"][s] for s in sizes], marker="o")
    left.set_xscale("log", base=2)
    left.set_xlabel("batch size (turns)")
    left.set_ylabel("turns / s (pipeline, claim → stored)")
    left.set_title(f"Throughput by batch size · {gen['model']}")
    left.grid(alpha=0.3)

    stages = gen["stage_ms_per_turn"]
    names = list(stages)[::-1]
    right.barh(names, [stages[n] for n in names], color="tab:orange")
    right.set_xscale("log")
    for y, name in enumerate(names):
        right.text(stages[name], y, f" {stages[name]:.2f}", va="center", fontsize=8)
    right.set_xlabel("ms per turn (log scale)")
    right.set_title(f"Where a turn's time goes at batch {gen['batch_size']}")
    where = gen.get("machine", {})
    fig.suptitle(
        f"mlchat · {where.get('gpu') or where.get('cpu', '')} · {where.get('cores', '?')} cores", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
