"""Calibrate the quality gate on labelled replies of the bundled model (data/quality_labels/).

labels.jsonl holds a person's verdict on each reply (`acceptable`: true / false, by CRITERION.md);
measures.jsonl holds the gate's threshold-free measures of the same replies, as the worker stored
them. The replies are split by position: even lines tune the thresholds (the bar with the best F1
for "not acceptable" on them), odd lines are held out and only reported on. A reply below the bar is
a prediction of "not acceptable". The bar kept is the one with the best balanced accuracy on the tune
half (the mean of the share of bad replies it flags and the share of acceptable ones it lets
through): the bundled model's replies are mostly bad, and F1 on them alone rewards a gate that
flags everything.

    python -m scripts.calibrate_quality        # prints the figures and writes calibration.json
    python -m scripts.calibrate_quality --desk-labels
        # adds the replies writers approved or rejected on the desk (/desk), from the database, with
        # the measures the worker stored for the same text, to the file's labels (they are other
        # replies: turn ids never match a labels.jsonl id); hand-edited replies are left out (their
        # measures are of the model's text). Prints the figures and writes nothing: calibration.json
        # records the committed labels' calibration, which a database's labels must not replace
    python -m scripts.calibrate_quality --remeasure-instructions
        # recomputes the instruction-echo measure of each reply from replies.jsonl first (it is text
        # only: the reply against the character's system prompt and post-history instruction, with
        # {{char}} and {{user}} filled in as the worker fills them)
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import asdict
from typing import Any

from core.settings import PROJECT_ROOT
from roleplay.quality import Bar, Quality, instruction_echo
from worker.prompt.layout import fill_macros

LABELS = PROJECT_ROOT / "data" / "quality_labels"
GRID = {
    "min_persona": [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3],
    "max_repetition": [0.3, 0.4, 0.5, 0.6, 0.7],
    "echo_span_words": [4, 5, 6, 8],
    "echo_share": [0.4, 0.5, 0.6, 0.8],
    "loop_sentence_repeats": [2, 3],
    "instruction_span_units": [4, 5, 6, 8],
}


def _load(desk_labels: bool = False) -> list[tuple[str, bool, Quality]]:
    def rows(name: str) -> dict[str, dict[str, Any]]:
        lines = (LABELS / name).read_text(encoding="utf-8").splitlines()
        return {r["id"]: r for r in map(json.loads, lines) if r}

    labels, measures = rows("labels.jsonl"), rows("measures.jsonl")
    items = {
        rid: (rid, bool(labels[rid]["acceptable"]), Quality.from_json(measures[rid]["quality"]))
        for rid in measures
        if rid in labels
    }
    if desk_labels:
        for label in _desk_labels():
            rid = str(label.turn_id)
            items[rid] = (rid, label.acceptable, Quality.from_json(label.quality))
    return list(items.values())


def _desk_labels() -> list[Any]:
    """The writers' verdicts stored by the desk (db/reviews.py)."""
    from db.reviews import writer_labels
    from db.session import session_scope

    with session_scope() as session:
        return writer_labels(session=session)


def _figures(items: list[tuple[str, bool, Quality]], bar: Bar) -> dict[str, Any]:
    flagged = [(ok, bool(q.below(bar))) for _, ok, q in items]
    acceptable = sum(1 for ok, _ in flagged if ok)
    passed = sum(1 for ok, below in flagged if ok and not below)
    tp = sum(1 for ok, below in flagged if below and not ok)
    fp = sum(1 for ok, below in flagged if below and ok)
    fn = sum(1 for ok, below in flagged if not below and not ok)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    specificity = passed / acceptable if acceptable else 1.0
    return {
        "replies": len(items),
        "not_acceptable": sum(1 for _, ok, _ in items if not ok),
        "flagged": tp + fp,
        "precision": round(precision, 3),
        "recall": round(recall, 3),
        "f1": round(f1, 3),
        "acceptable_passed": f"{passed} of {acceptable}",
        "balanced_accuracy": round((recall + specificity) / 2, 3),
    }


def calibrate(write: bool = True, desk_labels: bool = False) -> dict[str, Any]:
    """Search the bar on the tune half; `desk_labels` adds the writers' verdicts from the database
    (and then nothing is written: calibration.json is the committed labels' result)."""
    items = _load(desk_labels)
    tune, held_out = items[0::2], items[1::2]
    best_bar, best = Bar(), (-1.0, -1.0, -1.0)
    for values in itertools.product(*GRID.values()):
        bar = Bar(**dict(zip(GRID, values, strict=True)))
        f = _figures(tune, bar)
        if (f["balanced_accuracy"], f["precision"], f["recall"]) > best:
            best_bar, best = bar, (f["balanced_accuracy"], f["precision"], f["recall"])
    result = {
        "labelled": len(items),
        "bar": asdict(best_bar),
        "tune": _figures(tune, best_bar),
        "held_out": _figures(held_out, best_bar),
        "target": "precision and recall >= 0.85 on the held-out half",
    }
    if write and not desk_labels:
        (LABELS / "calibration.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def remeasure_instructions() -> int:
    """Write each reply's instruction_echo into measures.jsonl; how many replies have one."""
    replies = {
        r["id"]: r
        for r in map(json.loads, (LABELS / "replies.jsonl").read_text(encoding="utf-8").splitlines())
        if r
    }
    rows = [json.loads(line) for line in (LABELS / "measures.jsonl").read_text(encoding="utf-8").splitlines()]
    found = 0
    for row in rows:
        r = replies[row["id"]]
        char, user = r["character"]["name"], r.get("player_name") or "User"
        sources = [
            ("system_prompt", fill_macros(r["character"].get("system_prompt", ""), char, user)),
            (
                "post-history instruction",
                fill_macros(r["character"].get("post_history_instructions", ""), char, user),
            ),
        ]
        match = instruction_echo(r["reply"], [(name, text) for name, text in sources if text])
        row["quality"]["instruction_echo"] = None if match is None else match.as_json()
        found += match is not None
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    (LABELS / "measures.jsonl").write_text(text, encoding="utf-8")
    return found


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--remeasure-instructions", action="store_true")
    parser.add_argument("--desk-labels", action="store_true", help="add the writers' labels from the desk")
    args = parser.parse_args()
    if args.remeasure_instructions:
        print(f"instruction echo measured: {remeasure_instructions()} replies share two units or more")
    print(json.dumps(calibrate(desk_labels=args.desk_labels), indent=2))
