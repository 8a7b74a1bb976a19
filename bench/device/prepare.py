"""Inputs of the device checks in this folder, written to bench/device/inputs/ (ignored): the bundled
model's tokenizer files (its converted copy under .mlchat/models, made by `make demo` or a worker's
first start) and the action schema scripts/bench_structured.py measures. Run from the repository root:
`.venv/bin/python -m bench.device.prepare`; then carry bench/device/inputs and the wheels of xgrammar
0.2.8 (with apache-tvm-ffi, pydantic, pydantic-core, annotated-types, typing-inspection) for the GPU
machine's Python, and run `python3 bench/device/guided_cost.py` there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from core.settings import settings
from roleplay.actions import Action, reply_schema
from scripts.bench_structured import ACTIONS, MAX_NEW_TOKENS
from worker.model_cache import BUNDLED_MODEL
from worker.structured import say_chars

INPUTS = Path(__file__).parent / "inputs"


def main() -> None:
    converted = settings.model_cache_dir / BUNDLED_MODEL
    (INPUTS / "tok").mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "chat_template.jinja"):
        if (converted / name).exists():
            shutil.copy(converted / name, INPUTS / "tok" / name)
    schema = reply_schema([Action.model_validate(a) for a in ACTIONS], say_chars(MAX_NEW_TOKENS))
    (INPUTS / "schema.json").write_text(json.dumps(schema, sort_keys=True))
    print(f"wrote {INPUTS}")


if __name__ == "__main__":
    main()
