"""Kill-and-poison check: a character whose LoRA adapter the workers cannot load must not take the
fleet down with it.

    python -m scripts.check_poison [--turns 200] [--workers 2]

Starts two worker processes (LoRA on, their own model name and queue, gen.poison-check), registers
an adapter that cannot load (a valid config, broken weights) for one of three characters, and sends
the turns across the three characters, mixed in the same bulk batches. A worker that exits is
restarted, as compose's `restart:` would, and counted. It prints the counts and exits 1 unless every
turn of the other characters was answered, every turn of the poisoned one failed with a clear code
(adapter_unavailable, or engine_crash_loop if a request ever reached the engine and killed it), and
the workers stayed up (at most --max-restarts restarts). Replies are four tokens long. The workers
run with MLCHAT_MAX_OUTAGE_REFUNDS=0: a load failure may pass, so the default ten refunds, a minute
apart, would keep the poisoned turns queued some 13 minutes before their own attempts count.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from scripts.check_env import worker_env

MODEL = "poison-check"
POISONED = "poison-check-cursed"
HEALTHY = ("poison-check-tam", "poison-check-ida")


def _env(adapters: Path) -> dict[str, str]:
    return worker_env(
        MODEL,
        MLCHAT_ENABLE_LORA="true",
        MLCHAT_MAX_LORA_RANK="8",
        MLCHAT_ADAPTERS_DIR=str(adapters),
        MLCHAT_PIN_WORKER_CPUS="false",
        # A load failure may pass, so the poisoned turns are sent again a minute apart; with the
        # default ten refunds before their own attempts count, they would fail after some 13 minutes,
        # past the check's time (found running it this stop: 8 turns still queued at 400 s).
        MLCHAT_MAX_OUTAGE_REFUNDS="0",
        MLCHAT_CPU_KVCACHE_GIB=os.environ.get("MLCHAT_CPU_KVCACHE_GIB", "1"),
    )


def _prepare(work: Path, model_path: Path) -> None:
    """The three characters, and a broken adapter registered for one of them (its matrices of the
    workers' model, at `model_path`)."""
    import numpy as np
    from safetensors.numpy import save_file

    from db.migrate import upgrade
    from db.session import session_scope
    from db.world import upsert_character
    from services.lora.registry import register
    from services.lora.shapes import served_weights

    upgrade()
    with session_scope() as session:
        for slug in (POISONED, *HEALTHY):
            upsert_character(
                session=session,
                slug=slug,
                fields={"name": slug.rsplit("-", 1)[1].title(), "system_prompt": "Answer in a few words."},
            )
    broken = work / "broken-adapter"
    broken.mkdir()
    config = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "unused",
    }
    (broken / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    # Matrices that fit the served model (every check before the engine passes them) beside one
    # tensor vLLM's load refuses ("unsupported LoRA weight"): the load's own failure is what this
    # check is about, never reached by weights the worker's shape check refuses first.
    served = served_weights(model_path)
    q = "model.layers.0.self_attn.q_proj"
    out_size, in_size = served[f"{q}.weight"]
    tensors = {
        f"base_model.model.{q}.lora_A.weight": np.zeros((8, in_size), np.float32),
        f"base_model.model.{q}.lora_B.weight": np.zeros((out_size, 8), np.float32),
        f"base_model.model.{q}.lora_C.weight": np.zeros((8, 8), np.float32),
    }
    save_file(tensors, str(broken / "adapter_model.safetensors"))
    registered = register(POISONED, broken, every_tenant=True)  # no training record says whose
    print(
        f"registered a broken adapter for {POISONED}: v{registered.version} at {registered.path}", flush=True
    )


def _start(name: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    host = f"{name}@{os.uname().nodename}"
    return subprocess.Popen(
        [sys.executable, "-m", "worker", f"--hostname={host}"],
        env=env,
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _counts(ids: dict[str, list[uuid.UUID]]) -> dict[str, dict[str, int]]:
    from sqlalchemy import func, select

    from db.models import Turn
    from db.session import session_scope

    out: dict[str, dict[str, int]] = {}
    with session_scope() as session:
        for slug, turn_ids in ids.items():
            rows = session.execute(
                select(Turn.status, Turn.error_code, func.count())
                .where(Turn.id.in_(turn_ids))
                .group_by(Turn.status, Turn.error_code)
            ).tuples()
            out[slug] = {(f"{status.value}:{code}" if code else status.value): n for status, code, n in rows}
    return out


def main() -> int:
    """Run the check; 0 when the poisoned character fails alone and the fleet stays up."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-restarts", type=int, default=2, help="worker restarts allowed in all")
    parser.add_argument("--timeout", type=float, default=540.0)
    args = parser.parse_args()
    os.environ["MLCHAT_MODEL"] = MODEL  # this process's settings too (read at first import below)
    os.environ["MLCHAT_SERVED_MODELS"] = json.dumps([MODEL])
    from core.logging import configure_logging

    configure_logging()
    from core.settings import settings
    from services.lora.registry import adapters_dir
    from worker.model_cache import local_model_dir

    work = Path(tempfile.mkdtemp(prefix="mlchat-poison-"))
    env = _env(adapters_dir())  # the CLI's folder is the workers' (compose shares it as a volume)
    model_dir = local_model_dir(settings.model_copy(update={"model_path": env["MLCHAT_MODEL_PATH"]}))
    if model_dir is None:
        raise SystemExit(
            f"check_poison: no folder of {env['MLCHAT_MODEL_PATH']} on this host to fit an adapter to"
        )
    _prepare(work, model_dir)

    from services.producer import enqueue_turns
    from tasks.generate import dispatch

    slugs = [POISONED if i % 5 == 0 else HEALTHY[i % 2] for i in range(args.turns)]
    random.Random(7).shuffle(slugs)
    tag = uuid.uuid4().hex[:8]
    requests = [
        {
            "conversation": f"poison-{tag}-{i}",
            "character": slug,
            "message": f"Good evening, traveller {i}.",
            "params": {"max_new_tokens": 4, "seed": i},
        }
        for i, slug in enumerate(slugs)
    ]
    ids = enqueue_turns(requests, send=False)
    by_slug: dict[str, list[uuid.UUID]] = {}
    for slug, turn_id in zip(slugs, ids, strict=True):
        by_slug.setdefault(slug, []).append(turn_id)
    print(f"{args.turns} turns: " + ", ".join(f"{s} {len(t)}" for s, t in by_slug.items()), flush=True)

    names = [f"poison-w{i}" for i in range(args.workers)]
    workers = {name: _start(name, env, work / f"{name}.log") for name in names}
    restarts: dict[str, list[int]] = {name: [] for name in names}
    dispatch(ids, model=MODEL, lane="bulk")  # batches of MLCHAT_BATCH_SIZE, the characters mixed
    started = time.monotonic()
    try:
        while True:
            time.sleep(5)
            for name, proc in workers.items():
                code = proc.poll()
                if code is not None:
                    restarts[name].append(code)
                    print(f"worker {name} exited with {code}; restarting it", flush=True)
                    workers[name] = _start(name, env, work / f"{name}.log")
            counts = _counts(by_slug)
            open_turns = sum(n for c in counts.values() for k, n in c.items() if k in ("queued", "running"))
            print(f"{time.monotonic() - started:.0f} s: {counts}", flush=True)
            if not open_turns or time.monotonic() - started > args.timeout:
                break
        alive = {name: proc.poll() is None for name, proc in workers.items()}
    finally:
        for proc in workers.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=120)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)
    counts = _counts(by_slug)
    exits = sum(len(codes) for codes in restarts.values())
    print(f"final counts: {json.dumps(counts)}", flush=True)
    print(f"workers alive at the end: {alive}; exits (restarted): {restarts}; logs in {work}", flush=True)
    clear = ("failed:adapter_unavailable", "failed:engine_crash_loop")
    checks = {
        "every turn of the other characters answered": all(
            counts[s] == {"done": len(by_slug[s])} for s in HEALTHY
        ),
        "every turn of the poisoned character failed with a clear code": sum(
            n for k, n in counts[POISONED].items() if k in clear
        )
        == len(by_slug[POISONED]),
        f"workers up, restarted at most {args.max_restarts} times": all(alive.values())
        and exits <= args.max_restarts,
    }
    for check, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {check}", flush=True)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
