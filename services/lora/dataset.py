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
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.json_lines import json_line
from core.settings import DEFAULT_TENANT, settings
from core.whole_files import replaced_whole
from db.models import Character, ReviewLabel, Run
from db.session import session_scope
from db.training import character_exchanges, exchange_digest, writers_refused
from services.characters import CharacterNotFound
from services.lora.files import files_digest

TRAIN, VALIDATION, MANIFEST = "train.jsonl", "validation.jsonl", "manifest.json"


@dataclass(frozen=True)
class DatasetReport:
    out_dir: Path
    train: int
    validation: int
    manifest: dict[str, Any]


def _card_examples(character: Character, tokenizer: Any, prompt_format: str) -> list[tuple[str, str, str]]:
    """The card's example dialogue as (prompt, completion, message): the system prompt and the user's
    line laid out in the prompt format the worker serves (SOLAR's, EEVE's, gpt-oss's text, or the
    model's chat template), the character's line as the completion."""
    from worker.prompt.formats import escaped_label
    from worker.prompt.layout import CHAR_MACRO, default_system_prompt, fill_macros
    from worker.prompt.packing import PromptBuilder
    from worker.prompt.roles import fit_roles

    # The worker's own builder: its format escapes a chat template's plain-text role markers too
    # (Zephyr's `<|user|>`), and it knows which roles the template takes.
    builder = PromptBuilder(tokenizer, prompt_format, settings.max_model_len)
    fmt, sanitizer = builder.format, builder.sanitizer
    char, user = sanitizer.speaker_labels(character.name, "User")
    char, user = escaped_label(fmt, char), escaped_label(fmt, user)
    # The card is untrusted like every prompt text: its special-token strings and the format's role
    # markers are broken (a card's `<|im_end|>` became a real end of turn in the training prompt).
    clean = builder.cleaner(char, user)

    def filled(text: str, original: str = "") -> str:
        # As the prompt's own are filled, then cleaned: a token split around a macro stays broken.
        return clean(fill_macros(text, char, user, original))

    default = default_system_prompt(char)  # inserted as it is for {{original}}; the name filled once
    system = filled(character.system_prompt or default_system_prompt(CHAR_MACRO), default)
    out = []
    for example in character.example_dialogues or []:
        line, reply = str(example.get("user", "")).strip(), str(example.get("character", "")).strip()
        if not line or not reply:
            continue
        messages: list[Any] = [
            {"role": "system", "content": system},
            {"role": "user", "content": filled(line)},
        ]
        rendered = fmt.render(tokenizer, fit_roles(messages, builder.roles, char), char, user)
        # The completion is the voice to learn: its special-token strings broken, no marker escaped.
        out.append((rendered.text, sanitizer.scrub(fill_macros(reply, char, user)), line))
    return out


def served_layout(tokenizer: Any, prompt_format: str) -> dict[str, Any]:
    """How the worker hands this format's prompts to the engine: its name, and whether the tokenizer
    adds its special tokens (BOS for SOLAR, EEVE and gpt-oss's text) to the prompt's tokens, which
    training and its evaluation must add as the engine was given them."""
    from worker.prompt.formats import FORMATS

    probe = FORMATS[prompt_format].render(tokenizer, [{"role": "user", "content": "x"}], "A", "B")
    return {"prompt_format": prompt_format, "add_special_tokens": probe.add_special_tokens}


def export_dataset(
    slug: str,
    out_dir: Path,
    *,
    run: str | None = None,
    min_persona: float | None = None,
    validation_share: float = 0.1,
    tokenizer: Any = None,
    tenant: str = DEFAULT_TENANT,
) -> DatasetReport:
    """Write train.jsonl, validation.jsonl and manifest.json for the character from the tenant's
    conversations; KeyError if the character (or the tenant's run) does not exist, ValueError if
    nothing could be selected."""
    threshold = settings.quality_min_persona if min_persona is None else min_persona
    prompt_format = settings.resolved_prompt_format
    if tokenizer is None:
        from transformers import AutoTokenizer

        from worker.model_cache import resolve_model_path

        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(settings))
    with session_scope() as session:
        character = session.query(Character).filter(Character.slug == slug).one_or_none()
        if character is None:
            raise CharacterNotFound(f"no character {slug!r}")
        of_run = _tenants_run(session, run, tenant) if run else None
        run_id = of_run.id if of_run is not None else None
        # A writer's refusal holds for the same exchange anywhere: its twin in another run (the same
        # file run twice with the same seeds) would bring the refused text back unreviewed.
        refused = writers_refused(session=session, slug=slug, tenant=tenant)
    # A reply's special-token strings broken, as a card example's are: training's tokenizer reads
    # `<|im_end|>` spelled in a reply's text as a real end of turn (review of untrusted text).
    from worker.prompt.packing import PromptBuilder

    scrub = PromptBuilder(tokenizer, prompt_format, settings.max_model_len).sanitizer.scrub
    out_dir.mkdir(parents=True, exist_ok=True)
    files = (out_dir / TRAIN, out_dir / VALIDATION, out_dir / MANIFEST)
    with (
        replaced_whole(*files) as (train, validation, manifest_part),
        _Split(train, validation, validation_share) as split,
    ):
        left_out: Counter[str] = Counter()
        approved = 0
        # Each chunk of exchanges is read in a transaction of its own: none is open while writing.
        for exchange in character_exchanges(
            session=None, slug=slug, tenant=tenant, model=settings.model, run_id=run_id
        ):
            q = exchange.quality
            # A writer's verdict on the desk replaces the gate's.
            if exchange.label == ReviewLabel.REJECTED:
                left_out["rejected by a writer"] += 1
                continue
            digest = exchange_digest(exchange.prompt, exchange.reply)
            if digest in refused.rejected:  # a writer's rejection outweighs another's approval of its twin
                left_out["the same as a reply a writer rejected"] += 1
                continue
            if exchange.label != ReviewLabel.APPROVED:
                if digest in refused.replaced:
                    left_out["the same as a reply a writer replaced"] += 1
                    continue
                if exchange.edited:
                    left_out["edited by a writer, not approved"] += 1
                    continue
                if q.get("below_bar"):
                    left_out["below the bar"] += 1
                    continue
                if q.get("persona", -1.0) < threshold:
                    left_out[f"persona below {threshold}"] += 1
                    continue
            example = {
                "prompt": exchange.prompt,
                "completion": scrub(exchange.reply),
                "message": exchange.message,
                "source": "turn",
                "turn_id": str(exchange.turn_id),
                "persona": q.get("persona"),
                "label": exchange.label,
            }
            if not split.add(digest, example, side_of=exchange.prompt):
                left_out["duplicate"] += 1
                continue
            # counted once kept (review: a duplicate left out was counted approved too)
            approved += exchange.label == ReviewLabel.APPROVED
        stored = split.written
        for prompt, completion, message in _card_examples(character, tokenizer, prompt_format):
            example = {
                "prompt": prompt,
                "completion": completion,
                "message": message,
                "source": "card example",
            }
            if not split.add(exchange_digest(prompt, completion), example, side_of=prompt):
                left_out["duplicate"] += 1
        if not split.written:
            raise ValueError(
                f"no exchange of {slug!r} passed the selection ({dict(left_out) or 'none stored'})"
            )
        if of_run is not None:  # its deletion past retention began meanwhile: the set is short
            from services.runs.control import still_whole

            still_whole(of_run)
        counts, digest = split.finish()
        manifest = {
            "character": slug,
            "tenant": tenant,
            "model": settings.model,  # the model whose turns these are: `train` takes no other's
            "run": run,
            "selection": {
                "below_bar": "none",
                "min_persona": threshold,
                "writers": "approved replies kept, rejected ones left out, whatever the gate said;"
                " a twin of a rejected reply left out even if approved, of a replaced one unless approved",
            },
            "writer_approved": approved,
            "from_turns": stored,
            "from_card_examples": split.written - stored,
            "left_out": dict(left_out),
            "train": counts[TRAIN],
            "validation": counts[VALIDATION],
            "dataset_sha256": digest,
            # how the worker's engine was given these prompts: training tokenizes them the same way
            **served_layout(tokenizer, prompt_format),
        }
        manifest_part.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return DatasetReport(out_dir, counts[TRAIN], counts[VALIDATION], manifest)


def _tenants_run(session: Any, ref: str, tenant: str) -> Run:
    from services.runs import RunNotFound
    from services.runs.control import require_whole_run

    found = require_whole_run(session, ref)
    if found.tenant != tenant:
        raise RunNotFound(f"no run {ref!r} of the tenant {tenant!r}")
    session.expunge(found)
    return found  # type: ignore[no-any-return]


class _Split:
    """The train and validation files, written as examples arrive (a character of a million answered
    turns is never held in memory: only the hashes that drop duplicates are), each example's side
    decided by its hash (stable across exports)."""

    def __init__(self, train: Path, validation: Path, validation_share: float) -> None:
        self.paths = {TRAIN: train, VALIDATION: validation}
        self.share = validation_share
        self.seen: set[bytes] = set()
        self.counts = {TRAIN: 0, VALIDATION: 0}

    @property
    def written(self) -> int:
        return self.counts[TRAIN] + self.counts[VALIDATION]

    def __enter__(self) -> _Split:
        self.files = {name: path.open("wb") for name, path in self.paths.items()}
        return self

    def add(self, key: str, example: dict[str, Any], *, side_of: str) -> bool:
        """Write the example to its side, decided by `side_of` (its prompt): every reply to one
        prompt is on one side, so no held-out prompt was trained on with a sibling reply (the same
        file run twice, many players opening with the same line; review: keyed by prompt and
        reply, they fell on both). False for a duplicate of `key` (nothing written)."""
        digest = bytes.fromhex(key)
        if digest in self.seen:
            return False
        self.seen.add(digest)
        side_key = hashlib.sha256(side_of.encode()).hexdigest()
        side = VALIDATION if int(side_key[:8], 16) / 0xFFFFFFFF < self.share else TRAIN
        self.files[side].write(json_line(example).encode())
        self.counts[side] += 1
        return True

    def finish(self) -> tuple[dict[str, int], str]:
        """Close the files; (examples on each side, sha256 of train's bytes then validation's).
        With none held out, one example is moved to validation: the first whose prompt train holds no
        other reply to (moving any line brought back the held-out prompt trained on with a sibling
        reply; review); none when every prompt has several."""
        self.files[TRAIN].close()
        if not self.counts[VALIDATION] and self.counts[TRAIN] > 1 and self._move_one_alone():
            self.counts[TRAIN] -= 1
            self.counts[VALIDATION] += 1
        for name in (TRAIN, VALIDATION):
            self.files[name].close()
        return dict(self.counts), files_digest(self.paths[TRAIN], self.paths[VALIDATION])

    def _move_one_alone(self) -> bool:
        """Move train's first line whose prompt occurs once in it to validation: one read to count
        the prompts (only their hashes held), one to copy train without that line."""
        train = self.paths[TRAIN]

        def prompt_of(line: bytes) -> bytes:
            return hashlib.sha256(json.loads(line)["prompt"].encode()).digest()[:16]

        with train.open("rb") as lines:
            prompts = Counter(prompt_of(line) for line in lines)
        if 1 not in prompts.values():
            return False
        moved = b""
        kept = train.with_name(f".mlchat-{uuid.uuid4().hex}-kept.part")  # a killed writer's is swept
        try:
            with train.open("rb") as lines, kept.open("wb") as out:
                for line in lines:
                    if not moved and prompts[prompt_of(line)] == 1:
                        moved = line
                    else:
                        out.write(line)
            os.replace(kept, train)
        except BaseException:  # a full disk: no partial copy of the prompts left beside the set
            kept.unlink(missing_ok=True)
            raise
        self.files[VALIDATION].write(moved)
        return True

    def __exit__(self, *exc: object) -> None:
        for handle in self.files.values():
            handle.close()
