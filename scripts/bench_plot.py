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
    bottom = 0.0
    for stage, ms in stages.items():
        right.bar(["batched turn"], [ms], bottom=bottom, label=f"{stage} {ms:.1f} ms")
        bottom += ms
    right.set_ylabel("ms per turn")
    right.set_title(f"Stage breakdown at batch {gen['batch_size']}")
    right.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    where = gen.get("machine", {})
    fig.suptitle(
        f"mlchat · {where.get('gpu') or where.get('cpu', '')} · {where.get('cores', '?')} cores", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
