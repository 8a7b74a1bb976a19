"""Benchmark: what the quality gate sees in the bundled model's replies, and what best of n costs.

Every figure is measured here, in one process, on lines of data/sample_run_2000.jsonl run through the
real pipeline (worker/inline.py: claim, retrieve, prompt, engine, gate, store):

1. sampling sweep: the share of replies that loop, and the share below the bar, under a few sampling
   settings, on lines 512-639; the setting with the fewest loops is the shipped default;
2. below the bar on the first 512 lines: n = 1 with neutral sampling, n = 1 with the defaults,
   n = 2 and n = 4 with the defaults, with each check's count;
3. the time of n = 2 and n = 4 against n = 1 on the same 512 turns (one engine call per batch, the prompt
   computed once by the prefix cache);
4. the gate's precision and recall on the held-out half of the labels in data/quality_labels/
   (scripts/calibrate_quality.py).

`python -m scripts.bench_quality --dump-for-labels` writes the replies to be labelled instead.
"""

from __future__ import annotations

import os
from pathlib import Path

if __name__ == "__main__":
    # Run on its own: the benchmark's state (bench.py's), set before core.settings reads it.
    os.environ.setdefault(
        "MLCHAT_STATE_DIR", str(Path(__file__).resolve().parent.parent / ".mlchat" / "bench")
    )

import argparse
import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

from core.settings import PROJECT_ROOT, settings
from roleplay.quality import reason_kind
from scripts.bench_generation import sample_requests

LABELS = PROJECT_ROOT / "data" / "quality_labels"
NEUTRAL = {
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "min_p": 0.0,
    "top_k": 0,
}
SWEEP: dict[str, dict[str, Any]] = {
    "neutral": {},
    "repetition_penalty=1.1": {"repetition_penalty": 1.1},
    "repetition_penalty=1.2": {"repetition_penalty": 1.2},
    "repetition_penalty=1.3": {"repetition_penalty": 1.3},
    "frequency_penalty=0.5": {"frequency_penalty": 0.5},
    "presence_penalty=0.5": {"presence_penalty": 0.5},
    "repetition_penalty=1.2,min_p=0.05": {"repetition_penalty": 1.2, "min_p": 0.05},
}
MAX_NEW_TOKENS = 48  # the sample run's own length
SWEEP_FILE = PROJECT_ROOT / "bench" / "quality_sweep.json"


@contextlib.contextmanager
def sampling(**values: Any) -> Iterator[None]:
    """The sampling defaults turns are stored with, for the duration."""
    before = {name: getattr(settings, name) for name in values}
    for name, value in values.items():
        setattr(settings, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(settings, name, value)


def answer(lines: int, offset: int, n: int, tag: str) -> tuple[list[Any], float]:
    """The sample lines answered by the pipeline in this process; (turn views, seconds)."""
    from worker.inline import answer_now

    requests = sample_requests(lines, f"{tag}-{uuid.uuid4().hex[:6]}", MAX_NEW_TOKENS, offset)
    for r in requests:
        r["params"] = r["params"] | {"n": n}
    started = time.perf_counter()
    views = answer_now(requests)
    return views, time.perf_counter() - started


def below_bar(views: list[Any]) -> dict[str, Any]:
    """The share of answered turns below the bar, and how many each check put there."""
    answered = [v for v in views if v.quality]
    kinds: Counter[str] = Counter()
    below = 0
    for v in answered:
        reasons = v.quality["below_bar"]
        below += bool(reasons)
        kinds.update({reason_kind(r) for r in reasons})
    return {
        "answered": len(answered),
        "below_bar_share": round(below / max(len(answered), 1), 4),
        "by_check": dict(kinds.most_common()),
        "loop_share": round(kinds["loop"] / max(len(answered), 1), 4),
    }


def sampling_sweep(lines: int = 128, offset: int = 512) -> dict[str, Any]:
    """Loops and below-bar shares under each SWEEP setting, on the same lines and seeds."""
    results = {}
    for name, values in SWEEP.items():
        with sampling(**(NEUTRAL | values)):
            views, seconds = answer(lines, offset, 1, f"sweep-{name}")
        results[name] = below_bar(views) | {"seconds": round(seconds, 1)}
        print(name, results[name], flush=True)

    def rank(name: str) -> tuple[float, float]:
        return (results[name]["loop_share"], results[name]["below_bar_share"])

    best = min(rank(name) for name in results)
    fewest = [name for name in results if rank(name) == best]  # ties are listed, not broken
    sweep = {
        "lines": lines,
        "offset": offset,
        "results": results,
        "fewest_loops": fewest,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # Kept on its own too: the defaults are chosen from it, and the rest can be re-measured with
    # them (--reuse-sweep) without measuring the sweep again.
    SWEEP_FILE.write_text(json.dumps(sweep, indent=2) + "\n")
    return sweep


def seeded_versus_parallel_sampling(views: list[Any], n: int = 4) -> dict[str, Any]:
    """The raw engine, on the stored prompts of `views`: n seeded requests per prompt (what the
    worker sends) against one request with SamplingParams.n = n (vLLM's parallel sampling)."""
    from vllm import SamplingParams

    from worker.engine import get_engine

    loaded = get_engine()
    prompts = [
        {"prompt_token_ids": loaded.tokenizer(v.prompt, add_special_tokens=False)["input_ids"]}
        for v in views
        if v.prompt
    ]

    def params(seed: int, k: int) -> Any:
        return SamplingParams(
            n=k, seed=seed, max_tokens=MAX_NEW_TOKENS, temperature=settings.temperature, top_p=settings.top_p
        )

    timings = {}
    for name, inputs, sampling_params in (
        ("one_request", prompts, [params(i * n, 1) for i in range(len(prompts))]),
        (
            "seeded_requests",
            [p for p in prompts for _ in range(n)],
            [params(i * n + k, 1) for i in range(len(prompts)) for k in range(n)],
        ),
        ("sampling_params_n", prompts, [params(i * n, n) for i in range(len(prompts))]),
    ):
        loaded.llm.reset_prefix_cache()
        started = time.perf_counter()
        loaded.llm.generate(inputs, sampling_params, use_tqdm=False)
        timings[name] = round(time.perf_counter() - started, 2)
    return {
        "prompts": len(prompts),
        "n": n,
        "seconds": timings,
        "seeded_over_parallel": round(timings["seeded_requests"] / timings["sampling_params_n"], 3),
        # What n candidates cost the engine itself, before the pipeline: decode is n times the work,
        # and only the prefill is shared.
        "seeded_over_one_request": round(timings["seeded_requests"] / timings["one_request"], 3),
    }


def measure_quality(lines: int = 512, sweep_lines: int = 128, reuse_sweep: bool = False) -> dict[str, Any]:
    from scripts.calibrate_quality import calibrate
    from worker.engine import get_engine

    get_engine()
    saved_batch = settings.batch_size
    settings.batch_size = 64
    try:
        sweep = json.loads(SWEEP_FILE.read_text()) if reuse_sweep else sampling_sweep(sweep_lines)
        with sampling(**NEUTRAL):
            neutral, _ = answer(lines, 0, 1, "neutral-n1")
        n1, n1_s = answer(lines, 0, 1, "defaults-n1")
        n2, n2_s = answer(lines, 0, 2, "defaults-n2")
        n4, n4_s = answer(lines, 0, 4, "defaults-n4")
        engine_n = seeded_versus_parallel_sampling(n1[:128])
    finally:
        settings.batch_size = saved_batch
    defaults = {name: getattr(settings, name) for name in NEUTRAL}
    return {
        "lines": lines,
        "max_new_tokens": MAX_NEW_TOKENS,
        "sampling_sweep": sweep,
        "sampling_defaults": defaults,
        "below_bar": {
            "n1_neutral_sampling": below_bar(neutral),
            "n1_defaults": below_bar(n1),
            "n2_defaults": below_bar(n2),
            "n4_defaults": below_bar(n4),
        },
        "best_of_n_cost": {
            "n1_seconds": round(n1_s, 1),
            "n2_seconds": round(n2_s, 1),
            "n4_seconds": round(n4_s, 1),
            "n2_over_n1_time": round(n2_s / n1_s, 3),
            "n4_over_n1_time": round(n4_s / n1_s, 3),
            "target": "<= 2.0",
            "raw_engine": engine_n,
        },
        "gate_on_labels": calibrate(write=False),
    }


def dump_for_labels(lines: int = 240, offset: int = 1000) -> None:
    """Replies of lines offset.. for people to label: what a labeller needs (the instructions, the
    message, the reply) in replies.jsonl, the gate's measures apart in measures.jsonl."""
    from db.models import Character
    from db.session import session_scope
    from worker.engine import get_engine

    get_engine()
    settings.batch_size = 64
    views, _ = answer(lines, offset, 1, "labels")
    raw = (PROJECT_ROOT / "data" / "sample_run_2000.jsonl").read_text(encoding="utf-8").splitlines()
    source = [json.loads(x) for x in raw[offset : offset + lines]]
    LABELS.mkdir(parents=True, exist_ok=True)
    with session_scope() as s:
        sheets = {
            c.slug: {
                "name": c.name,
                "system_prompt": c.system_prompt,
                "post_history_instructions": c.post_history_instructions,
                "description": c.description,
                "personality": c.personality,
                "speech_style": c.speech_style,
            }
            for c in s.query(Character).all()
        }
    with (
        (LABELS / "replies.jsonl").open("w", encoding="utf-8") as replies,
        (LABELS / "measures.jsonl").open("w", encoding="utf-8") as measures,
    ):
        for line, view in zip(source, views, strict=True):
            if view.reply is None:
                continue
            rid = line["custom_id"]
            replies.write(
                json.dumps(
                    {
                        "id": rid,
                        "character": sheets[line["character"]],
                        "player_name": line.get("player_name", ""),
                        "message": line["message"],
                        "reply": view.reply,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
            measures.write(
                json.dumps(
                    {
                        "id": rid,
                        "finish_reason": (view.usage or {}).get("finish_reason"),
                        "quality": view.quality,
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    print(f"wrote {LABELS / 'replies.jsonl'} and measures.jsonl")


def main() -> None:
    """Run on the benchmark's own embedded services (bench.py's state dir); with --lines / --sweep-lines
    the quality section of bench/results.json is written here, with the sizes it was measured at."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dump-for-labels", action="store_true")
    parser.add_argument("--sweep-only", action="store_true")
    parser.add_argument("--lines", type=int, default=512)
    parser.add_argument("--sweep-lines", type=int, default=128)
    parser.add_argument("--reuse-sweep", action="store_true", help=f"take the sweep from {SWEEP_FILE.name}")
    args = parser.parse_args()
    from core.logging import configure_logging
    from db.migrate import upgrade
    from scripts.bench import machine
    from scripts.seed import seed_world

    configure_logging("WARNING")
    upgrade()
    seed_world()
    if args.dump_for_labels:
        dump_for_labels()
        return
    if args.sweep_only:
        from worker.engine import get_engine

        get_engine()
        settings.batch_size = 64
        print(json.dumps(sampling_sweep(args.sweep_lines), indent=2))
        return
    started = time.perf_counter()
    figures = measure_quality(lines=args.lines, sweep_lines=args.sweep_lines, reuse_sweep=args.reuse_sweep)
    figures |= {
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = PROJECT_ROOT / "bench" / "results.json"
    results = json.loads(out.read_text()) if out.exists() else {}
    results["quality"] = figures
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(figures, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
