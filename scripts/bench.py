"""`python -m scripts.bench` (`make bench`): every benchmark, on the embedded services by default.

Writes bench/results.json (each section with the machine it ran on) and bench/throughput.png.
Sections: enqueue, retrieval, generation (the pipeline), engine (the engine loop), quality (the
gate, sampling defaults, best of n), lora (serving an adapter against the base model), streaming
(live turns as SSE through an API process: first delta, delivery, 200 readers), scenes (scene runs:
engine busy share, wall time against the same number of independent turns), fleet (the fleet
simulator, scripts/fleet_simulator.py: 1, 2, 4, 8 worker processes with a stand-in engine against
the one PostgreSQL and Redis), memory (needle recall with summaries and facts against retrieval
alone, prompt tokens, live latency while memory jobs run; scaled down to this machine, and said
so), structured (guided decoding: schema validity of NPC replies, their cost, the
grammar's compile time); `--only` picks some, `--quick` shrinks them for a smoke run
(its figures are not comparable and are written to bench/results.quick.json instead).

On a GPU machine: install requirements/gpu.txt, point MLCHAT_MODEL / MLCHAT_MODEL_PATH at the
production model (and DATABASE_URL / REDIS_URL at real servers if wanted: the enqueue and fleet
sections then skip, saying so, since they purge the model's queues), then run the same command.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Before anything imports core.settings (it reads the environment once): the benchmark's own state
# (its PostgreSQL and Redis, and the 1M-row retrieval world, kept between runs).
os.environ.setdefault("MLCHAT_STATE_DIR", str(PROJECT_ROOT / ".mlchat" / "bench"))
os.environ.setdefault("MLCHAT_EMBEDDED_PG_SHARED_BUFFERS", "1GB")  # the 1M-row world's hot set
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from worker.cpu_affinity import ORIGINAL_CPUS  # noqa: E402

SECTIONS = (
    "enqueue",
    "retrieval",
    "generation",
    "engine",
    "quality",
    "lora",
    "streaming",
    "scenes",
    "fleet",
    "memory",
    "structured",
)


RESERVED_KEYS = frozenset({"machine", "measured_at", "seconds"})


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    from worker.engine import cpu_flags

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_flags": sorted(cpu_flags()),
        # The machine's cores, not this process's: after an engine loads, the process is pinned off
        # the engine's core (worker/cpu_affinity.py), and a later section recorded 1 of 2.
        "cores": len(ORIGINAL_CPUS),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu,
        "python": platform.python_version(),
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            return next(
                (line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None
            )
    except OSError:
        return None


# Sections that purge the model's queues (and, for the fleet, start workers answering with canned
# lines): run on the benchmark's own embedded services only, skipped against configured servers.
OWN_SERVICES_ONLY = {
    "enqueue": "it purges the model's queues after its turns (other producers' messages with them)",
    "fleet": "its stand-in workers answer real turns with canned lines, and it purges the queues",
}


def main(argv: list[str] | None = None) -> None:
    """Run the chosen sections and record their figures."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the results file")
    parser.add_argument(
        "--retrieval-messages",
        type=int,
        default=1_000_000,
        help="retrieval world size (10000000: the 10M-message world, 100 messages per conversation)",
    )
    parser.add_argument(
        "--memory-conversations",
        type=int,
        default=10,
        help="conversations of 300 lines in the memory section (the issue's figure is 100)",
    )
    args = parser.parse_args(argv)
    out = PROJECT_ROOT / "bench" / ("results.quick.json" if args.quick else "results.json")
    png = out.with_name("throughput.quick.png" if args.quick else "throughput.png")
    if args.plot_only:
        from scripts.bench_plot import plot

        print("plot:", plot(json.loads(out.read_text()), png))
        return

    from core.logging import configure_logging
    from db.migrate import upgrade
    from scripts.bench_plot import plot
    from scripts.seed import seed_world

    configure_logging("WARNING")
    upgrade()
    seed_world()
    out.parent.mkdir(exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    where = machine()
    from scripts.fleet_simulator import configured_services

    configured = configured_services()
    for section in args.only:
        if section in OWN_SERVICES_ONLY and configured:
            print(
                f"bench: section {section} skipped: {configured} set; {OWN_SERVICES_ONLY[section]}",
                flush=True,
            )
            continue
        started = time.perf_counter()
        figures = _run(section, args.quick, args.retrieval_messages, args.memory_conversations)
        for key in sorted(RESERVED_KEYS & set(figures)):  # kept, not overwritten below (the lora
            figures[f"section_{key}"] = figures.pop(key)  # section's own timings once were)
            print(f"bench: section {section}'s own {key!r} is kept as 'section_{key}'", flush=True)
        figures["machine"] = where
        figures["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        figures["seconds"] = round(time.perf_counter() - started, 1)
        results[section] = figures
        out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        print(json.dumps({section: figures}, indent=2, ensure_ascii=False), flush=True)
    if "generation" in results and "engine" in results:
        print("plot:", plot(results, png))


def _run(
    section: str, quick: bool, retrieval_messages: int = 1_000_000, memory_conversations: int = 10
) -> dict[str, Any]:
    if section == "enqueue":
        from scripts.bench_enqueue import measure_enqueue

        return measure_enqueue(single=200 if quick else 2000, bulk=5000 if quick else 100_000)
    if section == "retrieval":
        from scripts.bench_retrieval import measure_retrieval

        if quick:
            return measure_retrieval(messages=20_000, conversations=200, events=5_000, rounds=5)
        return measure_retrieval(messages=retrieval_messages, conversations=retrieval_messages // 100)
    if section == "lora":
        from scripts.bench_lora import measure_lora

        return measure_lora(prompts=8, max_tokens=8) if quick else measure_lora()
    if section == "quality":
        from scripts.bench_quality import measure_quality

        return measure_quality(lines=64, sweep_lines=16) if quick else measure_quality()
    if section == "streaming":
        from scripts.bench_streaming import measure_streaming

        if quick:
            return measure_streaming(
                probes=2, bulk_turns=48, readers=20, reader_bulk_turns=16, max_new_tokens=16, reader_rounds=1
            )
        return measure_streaming()
    if section == "scenes":
        from scripts.bench_scenes import measure_scenes

        return measure_scenes(scenes=12, exchanges=3, max_new_tokens=16) if quick else measure_scenes()
    if section == "fleet":
        from scripts.fleet_simulator import measure_fleet

        if quick:
            return measure_fleet((1, 2), seconds=8.0, warmup=4.0, bulk_lines=2_000)
        return measure_fleet()
    if section == "memory":
        from scripts.bench_memory import measure_memory

        if quick:
            return measure_memory(conversations=2, turns=120, probes_live=2)
        return measure_memory(conversations=memory_conversations)
    if section == "structured":
        from scripts.bench_structured import measure_structured

        return measure_structured(lines=32, turns=16) if quick else measure_structured()
    if section == "engine":
        from scripts.bench_engine import measure_engine

        if quick:
            return measure_engine(probes=2, bulk_turns=32, backlog=48, max_new_tokens=16, dtype_turns=4)
        return measure_engine()
    from scripts.bench_generation import measure_generation

    if quick:
        return measure_generation(turns=32, batch=16, prefix_turns=16)
    return measure_generation()


if __name__ == "__main__":
    main()
