"""`mlchat lora train`: a LoRA adapter (PEFT) on the model the worker serves, from a dataset written
by `mlchat lora dataset`. The loss is on the replies only: each example is the prompt as the worker
built it (chat template included) followed by the kept reply and the end-of-turn token, and every
prompt token's label is masked. The adapter is saved with its training config, the dataset's
sha256 and the losses before and after; the same command runs on a CPU with the bundled model and on
a GPU with the production one (MLCHAT_MODEL_PATH).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.settings import settings
from core.whole_files import replaced_whole
from services.lora.dataset import MANIFEST, TRAIN, VALIDATION
from services.lora.files import BadLoraFile, bytes_digest, read_examples, read_object, read_whole

logger = logging.getLogger(__name__)

IGNORE = -100  # the label of a token the loss skips

Progress = Callable[[int, int, float], None]  # (step, steps, loss)


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    epochs: int = 1
    learning_rate: float = 2e-4
    max_steps: int | None = None  # stop early (a smoke run); None: every epoch
    batch_size: int = 4
    max_length: int = 1024  # tokens; a longer example loses the start of its prompt, never its reply
    seed: int = 0
    # torch threads on a CPU; None: the cores no vLLM engine of this process is bound to (a thread on
    # a core the engine spins on stalls every step: measured 12x slower here).
    threads: int | None = None
    evaluate: bool = True  # before/after on the validation prompts (services/lora/evaluate.py)
    eval_max_new_tokens: int = 48


@dataclass
class TrainReport:
    adapter_dir: Path
    steps: int
    seconds: float
    losses: dict[str, float | None] = field(default_factory=dict)  # None: a loss of nothing
    evaluation: dict[str, Any] | None = None


def encode(
    tokenizer: Any, prompt: str, completion: str, max_length: int, add_special_tokens: bool = False
) -> tuple[list[int], list[int]] | None:
    """(input ids, labels): the prompt's labels masked, the reply's and its end-of-turn token kept.
    With `add_special_tokens` (the manifest's: the worker tokenized this format's prompts so), the
    prompt opens with what the tokenizer adds before it (BOS), as the engine was given it. When too
    long, the prompt loses its start after those; the reply is never cut: None when it does not fit
    whole with a token of its prompt (it was cut to the length with no prompt and no end, teaching
    text that never ends; review)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    opening = prompt_opening(tokenizer, prompt, prompt_ids) if add_special_tokens else []
    reply_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(opening) + len(reply_ids) >= max_length:
        return None
    room = max_length - len(opening) - len(reply_ids)
    prompt_ids = opening + prompt_ids[max(0, len(prompt_ids) - room) :]
    return prompt_ids + reply_ids, [IGNORE] * len(prompt_ids) + reply_ids


def prompt_opening(tokenizer: Any, prompt: str, prompt_ids: list[int]) -> list[int]:
    """The tokens the tokenizer puts before `prompt`'s own when it adds its special tokens (BOS)."""
    full = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    cut = len(full) - len(prompt_ids)
    return full[:cut] if cut > 0 and full[cut:] == list(prompt_ids) else []


def _free_cores() -> int:
    import os

    from worker.cpu_affinity import engine_cpus

    return max(1, len(set(os.sched_getaffinity(0)) - engine_cpus()))


def placement() -> tuple[str, Any]:
    """Where the model trains and in what dtype: a GPU in bfloat16 when it has it natively (not
    emulated: a T4 or V100 would be slow), else float32 there too (float16 without loss scaling lets
    the adapter's gradients underflow); the CPU in float32. PEFT keeps the adapter's own weights in
    float32 either way."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", torch.float32
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    return "cuda", torch.bfloat16 if native else torch.float32


def _batches(
    examples: Sequence[tuple[list[int], list[int]]], size: int, pad: int, device: str = "cpu"
) -> list[dict[str, Any]]:
    import torch

    out = []
    for start in range(0, len(examples), size):
        chunk = examples[start : start + size]
        width = max(len(ids) for ids, _ in chunk)
        out.append(
            {
                "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk]),
                "attention_mask": torch.tensor(
                    [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk]
                ),
                "labels": torch.tensor([labels + [IGNORE] * (width - len(labels)) for _, labels in chunk]),
            }
        )
        out[-1] = {k: v.to(device) for k, v in out[-1].items()}
    return out


def _same_export(dataset_dir: Path, manifest: dict[str, Any], digest: str) -> None:
    """BadLoraFile unless the train and validation files are those the manifest was written with:
    each of the three files is put in place whole, but not the three at once, and a reader between
    two renames (or an export killed there) would pair one export's lines with another's manifest,
    whose `tenant` says whose turns the adapter may answer. A hand-made manifest without
    `dataset_sha256` vouches for no files."""
    recorded = manifest.get("dataset_sha256")
    if recorded is None:
        return
    if recorded != digest:
        raise BadLoraFile(
            f"{dataset_dir / MANIFEST}: dataset_sha256: does not match {TRAIN} and {VALIDATION} (written by"
            " another export, or edited since): export the set again, or delete dataset_sha256 from the"
            " manifest to train on edited files"
        )


def _write_record(path: Path, record: dict[str, Any]) -> None:
    """The training record, put in place whole: a reader (`lora register`) never sees part of one."""
    with replaced_whole(path) as (part,):
        part.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _mean_loss(model: Any, batches: list[dict[str, Any]]) -> float:
    import torch

    if not batches:
        return float("nan")
    model.eval()
    with torch.no_grad():
        losses = [float(model(**batch).loss) for batch in batches]
    model.train()
    return sum(losses) / len(losses)


def train_adapter(
    dataset_dir: Path,
    adapter_dir: Path,
    config: TrainConfig = TrainConfig(),
    progress: Progress | None = None,
) -> TrainReport:
    """Train the adapter and save it (adapter weights, adapter_config.json, training_config.json)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.model_cache import resolve_model_path

    # Each file read once, its rows and its digest from the same bytes: read twice, an export renaming
    # its files in between paired one export's rows with another's manifest.
    train_bytes, held_bytes = read_whole(dataset_dir / TRAIN), read_whole(dataset_dir / VALIDATION)
    train_rows = read_examples(dataset_dir / TRAIN, train_bytes)
    held_rows = read_examples(dataset_dir / VALIDATION, held_bytes)  # both read before the model loads
    if not train_rows:
        raise BadLoraFile(f"{dataset_dir / TRAIN}: no examples (write one with `mlchat lora dataset`)")
    manifest = read_object(dataset_dir / MANIFEST)
    _same_export(dataset_dir, manifest, bytes_digest(train_bytes, held_bytes))
    if config.evaluate and not isinstance(manifest.get("character"), str):
        raise BadLoraFile(f"{dataset_dir / MANIFEST}: character: missing (`mlchat lora dataset` writes it)")
    exported_for = manifest.get("model")
    if exported_for is not None and exported_for != settings.model:  # before hours of training
        raise BadLoraFile(
            f"{dataset_dir / MANIFEST}: model: the data set holds {exported_for!r}'s turns and prompts, and"
            f" MLCHAT_MODEL is {settings.model!r}: train with that model's settings, or export again"
        )
    from services.characters import character_exists

    if config.evaluate and not character_exists(manifest["character"]):  # before hours of training
        raise BadLoraFile(
            f"{dataset_dir / MANIFEST}: character: no character {manifest['character']!r} here to evaluate"
            " against (import it, or train with --no-evaluate)"
        )
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device, dtype = placement()
    if device == "cpu":
        torch.set_num_threads(config.threads or _free_cores())
    base = resolve_model_path(settings)
    tokenizer = AutoTokenizer.from_pretrained(base)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    specials = manifest.get("add_special_tokens") is True
    encoded = {
        side: [encode(tokenizer, r["prompt"], r["completion"], config.max_length, specials) for r in rows]
        for side, rows in (("train", train_rows), ("validation", held_rows))
    }
    train = [e for e in encoded["train"] if e is not None]
    held = [e for e in encoded["validation"] if e is not None]
    too_long = {side: sum(e is None for e in each) for side, each in encoded.items()}
    if not train:
        raise BadLoraFile(
            f"{dataset_dir / TRAIN}: every reply is {config.max_length} tokens or longer (--max-length):"
            " none fits whole with its prompt"
        )  # before the model loads
    model: Any = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device),  # type: ignore[arg-type]
        LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha,
            lora_dropout=config.dropout,
            target_modules=list(config.target_modules),
            task_type="CAUSAL_LM",
        ),
    )
    held_batches = _batches(held, config.batch_size, pad, device)
    per_epoch = math.ceil(len(train) / config.batch_size)
    steps = min(config.max_steps or per_epoch * config.epochs, per_epoch * config.epochs)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    losses = {"validation_before": _mean_loss(model, held_batches)}
    started, step, last = time.perf_counter(), 0, float("nan")
    model.train()
    while step < steps:
        order = list(train)
        random.shuffle(order)
        for batch in _batches(order, config.batch_size, pad, device):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step, last = step + 1, float(loss.detach())
            if progress:
                progress(step, steps, last)
            if step >= steps:
                break
    losses |= {"train_last": last, "validation_after": _mean_loss(model, held_batches)}
    # Saved before the evaluation: a failure there (the database away, the embedder) must not throw
    # the trained adapter away.
    adapter_dir.mkdir(parents=True, exist_ok=True)
    config_file = adapter_dir / "training_config.json"
    # An earlier adapter's record goes first: these weights saved beside it, and the saving stopped
    # before the new record, `lora register` would read whose turns they answer from the old one
    # (a card-only adapter's: every tenant's). Without a record, register asks.
    config_file.unlink(missing_ok=True)
    model.save_pretrained(adapter_dir)
    record: dict[str, Any] = {
        "base_model": str(base),
        # the model whose turns it answers (`lora register` binds it to that model's turns alone)
        "model": settings.model,
        "character": manifest.get("character"),
        # whose dialogue it learnt from (none but the card's examples: from_turns 0): whom it may answer
        "tenant": manifest.get("tenant"),
        "from_turns": manifest.get("from_turns"),
        "dataset": str(dataset_dir),
        "dataset_sha256": manifest.get("dataset_sha256"),
        # replies that do not fit --max-length whole are left out, never cut
        "examples": {"train": len(train), "validation": len(held), "left_out_too_long": too_long},
        "config": asdict(config),
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 1),
        # a loss of nothing (no held-out example, or no step) is null: NaN is no JSON (jq, JSON.parse)
        "losses": {k: round(v, 4) if math.isfinite(v) else None for k, v in losses.items()},
        "evaluation": None,
    }
    _write_record(config_file, record)
    if config.evaluate:
        from services.lora.evaluate import evaluate

        try:
            record["evaluation"] = evaluate(
                model, tokenizer, held_rows, manifest["character"], config.eval_max_new_tokens, specials
            )
        except Exception as exc:  # the adapter stands; its config says why it has no evaluation
            logger.warning("the adapter is saved; its evaluation failed", exc_info=True)
            record["evaluation"] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        _write_record(config_file, record)
    return TrainReport(adapter_dir, steps, record["seconds"], record["losses"], record["evaluation"])
