"""`mlchat lora dataset`: a character's stored exchanges as prompt/completion JSONL for fine-tuning.

Each example is the prompt exactly as the worker gave it to the engine (persona, lore, retrieved
context, history, chat template) and the reply it kept, so a LoRA learns the voice in the context it
will be served in. Selected by quality: no reason below the bar, persona score at or above a
threshold; optionally one run's only. A writer's label from the desk replaces that selection: an
approved reply is kept, a rejected one left out, and a hand-edited reply is kept only once approved.
The card's example dialogue is added, rendered with the model's chat template. Duplicates are
dropped, the rest split train/validation by a hash of the example (stable across exports), and
manifest.json says what was selected, what was left out and why.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import settings
from db.models import Character, ReviewLabel
from db.session import session_scope
from db.training import character_exchanges

TRAIN, VALIDATION, MANIFEST = "train.jsonl", "validation.jsonl", "manifest.json"


@dataclass(frozen=True)
class DatasetReport:
    out_dir: Path
    train: int
    validation: int
    manifest: dict[str, Any]


def _example_hash(prompt: str, completion: str) -> str:
    return hashlib.sha256(f"{prompt}\x00{completion}".encode()).hexdigest()


def _card_examples(character: Character, tokenizer: Any) -> list[tuple[str, str]]:
    """The card's example dialogue as (prompt, completion): system prompt and the user's line through
    the model's chat template, the character's line as the completion."""
    from worker.prompt.layout import default_system_prompt, fill_macros
    from worker.prompt.sanitize import Sanitizer

    # The card is untrusted like every prompt text: its special-token strings are broken (a card's
    # `<|im_end|>` became a real end of turn in the training prompt, and a trained target).
    scrub = Sanitizer(tokenizer).scrub

    def filled(text: str, original: str = "") -> str:
        # As the prompt's own are filled, then cleaned: a token split around a macro stays broken.
        return scrub(fill_macros(text, character.name, "User", original))

    default = default_system_prompt(character.name)
    system = filled(character.system_prompt or default, default)
    out = []
    for example in character.example_dialogues or []:
        user, reply = str(example.get("user", "")).strip(), str(example.get("character", "")).strip()
        if not user or not reply:
            continue
        messages = [{"role": "system", "content": system}, {"role": "user", "content": filled(user)}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append((prompt, filled(reply)))
    return out


def export_dataset(
    slug: str,
    out_dir: Path,
    *,
    run: str | None = None,
    min_persona: float | None = None,
    validation_share: float = 0.1,
    tokenizer: Any = None,
) -> DatasetReport:
    """Write train.jsonl, validation.jsonl and manifest.json for the character; KeyError if the
    character (or the run) does not exist, ValueError if nothing could be selected."""
    from services.runs import require_run

    threshold = settings.quality_min_persona if min_persona is None else min_persona
    if tokenizer is None:
        from transformers import AutoTokenizer

        from worker.model_cache import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings))
    left_out: Counter[str] = Counter()
    examples: dict[str, dict[str, Any]] = {}
    approved = 0
    with session_scope() as session:
        character = session.query(Character).filter(Character.slug == slug).one_or_none()
        if character is None:
            raise KeyError(f"no character {slug!r}")
        run_id = require_run(session, run).id if run else None
        for exchange in character_exchanges(session=session, slug=slug, run_id=run_id):
            q = exchange.quality
            # A writer's verdict on the desk replaces the gate's.
            if exchange.label == ReviewLabel.REJECTED:
                left_out["rejected by a writer"] += 1
                continue
            if exchange.label != ReviewLabel.APPROVED:
                if exchange.edited:
                    left_out["edited by a writer, not approved"] += 1
                    continue
                if q.get("below_bar"):
                    left_out["below the bar"] += 1
                    continue
                if q.get("persona", -1.0) < threshold:
                    left_out[f"persona below {threshold}"] += 1
                    continue
            approved += exchange.label == ReviewLabel.APPROVED
            key = _example_hash(exchange.prompt, exchange.reply)
            if key in examples:
                left_out["duplicate"] += 1
                continue
            examples[key] = {
                "prompt": exchange.prompt,
                "completion": exchange.reply,
                "source": "turn",
                "turn_id": str(exchange.turn_id),
                "persona": q.get("persona"),
                "label": exchange.label,
            }
        stored = len(examples)
        for prompt, completion in _card_examples(character, tokenizer):
            key = _example_hash(prompt, completion)
            if key in examples:
                left_out["duplicate"] += 1
                continue
            examples[key] = {"prompt": prompt, "completion": completion, "source": "card example"}
    if not examples:
        raise ValueError(f"no exchange of {slug!r} passed the selection ({dict(left_out) or 'none stored'})")
    out_dir.mkdir(parents=True, exist_ok=True)
    buckets: dict[str, list[str]] = {TRAIN: [], VALIDATION: []}
    for key in sorted(examples):
        held = int(key[:8], 16) / 0xFFFFFFFF < validation_share
        buckets[VALIDATION if held else TRAIN].append(key)
    if not buckets[VALIDATION] and len(buckets[TRAIN]) > 1:  # keep at least one example to validate on
        buckets[VALIDATION].append(buckets[TRAIN].pop())
    digest = hashlib.sha256()
    for name, keys in buckets.items():
        with (out_dir / name).open("w", encoding="utf-8") as out:
            for key in keys:
                line = json.dumps(examples[key], ensure_ascii=False) + "\n"
                digest.update(line.encode())
                out.write(line)
    manifest = {
        "character": slug,
        "run": run,
        "selection": {
            "below_bar": "none",
            "min_persona": threshold,
            "writers": "approved replies kept, rejected ones left out, whatever the gate said",
        },
        "writer_approved": approved,
        "from_turns": stored,
        "from_card_examples": len(examples) - stored,
        "left_out": dict(left_out),
        "train": len(buckets[TRAIN]),
        "validation": len(buckets[VALIDATION]),
        "dataset_sha256": digest.hexdigest(),
    }
    (out_dir / MANIFEST).write_text(
        json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return DatasetReport(out_dir, len(buckets[TRAIN]), len(buckets[VALIDATION]), manifest)
