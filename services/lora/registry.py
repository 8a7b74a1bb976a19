"""`mlchat lora register`: a trained adapter becomes a character's voice, one version up.

The adapter folder is copied under MLCHAT_ADAPTERS_DIR (a volume the workers share), so a later
retraining in place never changes what a running worker serves; the worker loads it on demand as
`<slug>@v<version>` and records that name on every turn it answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.settings import TENANT_NAME, settings
from db.session import session_scope
from db.world import register_adapter, registered_adapter_path, registered_adapter_paths, unregister_adapter
from services.characters import CharacterNotFound, character_exists
from services.lora.engine_check import engine_refusal
from services.lora.files import BadLoraFile, read_object
from services.lora.shapes import served_weights, shape_refusal
from worker.model_cache import local_model_dir


@dataclass(frozen=True)
class Registered:
    slug: str
    version: int
    path: Path
    tenant: str | None = None  # whose turns it answers (None: every tenant's)
    model: str | None = None  # the model whose turns it answers


def adapters_dir() -> Path:
    return settings.adapters_dir or settings.state_dir / "adapters"


class TrainedOnATenant(ValueError):
    """An adapter trained on one tenant's dialogue asked to answer another tenant's turns, or one
    whose record does not say whose dialogue it learnt from, registered without saying whom it
    answers."""


class TrainedForAModel(ValueError):
    """An adapter asked to answer a model's turns its training record says it was not trained on, or
    one for a model the fleet does not serve, or one whose record does not say which model where
    several are served."""


def _trained_on(adapter_dir: Path) -> tuple[bool, str | None, int]:
    """What the adapter's training record says of its data: (whether it says, the tenant whose
    dialogue it learnt from, how many exchanges of it). A record of before it said reads its data
    set's manifest, whose path it keeps."""
    record_path = adapter_dir / "training_config.json"
    if not record_path.is_file():
        return False, None, 0
    record = read_object(record_path)
    if "from_turns" not in record and isinstance(record.get("dataset"), str):
        record = _its_manifest(record)
    if "from_turns" not in record:
        return False, None, 0
    turns = record.get("from_turns")
    tenant = record.get("tenant")
    return True, tenant if isinstance(tenant, str) else None, turns if isinstance(turns, int) else 1


def _its_manifest(record: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the data set a training record of before records said names, if it is still
    that data set (its digest and character the record's: the folder may hold another set since);
    else the record as it is (it does not say)."""
    try:
        manifest = read_object(Path(record["dataset"]) / "manifest.json")
    except (BadLoraFile, OSError):  # gone, unreadable, not JSON: the record does not say
        return record
    same = manifest.get("dataset_sha256") and manifest.get("dataset_sha256") == record.get("dataset_sha256")
    return manifest if same and manifest.get("character") == record.get("character") else record


def served_to(
    adapter_dir: Path, *, tenant: str | None, every_tenant: bool, shown: Path | None = None
) -> str | None:
    """Whose turns the adapter answers (None: every tenant's). One trained on a tenant's dialogue (its
    training record, from `mlchat lora train`, or its data set's manifest says whose) answers that
    tenant's alone, unless `every_tenant` says aloud to serve their players' history to all; never
    another tenant alone. One trained on the card's examples alone answers `tenant`'s, or every
    tenant's. One whose record does not say (trained elsewhere, or its data set gone) must be told:
    `tenant` or `every_tenant`. Messages name `shown` (the folder the user gave, when this is its copy)."""
    if tenant is not None and every_tenant:
        raise TrainedOnATenant("--tenant and --every-tenant: one or the other")
    if tenant is not None and not (len(tenant) <= 64 and TENANT_NAME.fullmatch(tenant)):  # '': the CLI's
        raise TrainedOnATenant(
            f"--tenant: {tenant[:80]!r} is no tenant's name (letters, digits, '.', '_', '-')"
        )
    named = shown or adapter_dir
    try:
        says, trained_on, turns = _trained_on(adapter_dir)
    except BadLoraFile as exc:
        raise BadLoraFile(str(exc).replace(str(adapter_dir), str(named))) from None
    if says and not turns:  # the card's examples alone
        return None if every_tenant else tenant
    if not says or trained_on is None:
        if tenant is None and not every_tenant:
            raise TrainedOnATenant(
                f"{named}: its training record does not say whose dialogue it learnt from; "
                "pass --tenant (the tenant whose turns it answers) or --every-tenant"
            )
        return tenant
    if tenant is not None and tenant != trained_on:
        raise TrainedOnATenant(
            f"{named}: trained on tenant {trained_on!r}'s dialogue ({turns} exchanges), "
            f"not tenant {tenant!r}'s: it answers {trained_on!r}'s turns (or, with --every-tenant, all)"
        )
    return None if every_tenant else trained_on


def served_on(adapter_dir: Path, *, model: str | None, shown: Path | None = None) -> str:
    """The model whose turns the adapter answers: the one its training record says it was trained on
    (`mlchat lora train` writes it), else `model`, else the fleet's one model. A character's turns on
    another model get the base model: applied to them, an adapter of other shapes failed every turn,
    and one of the same shapes (EEVE's beside SOLAR's) answered with weights learnt on another model
    (review). Messages name `shown` (the folder the user gave, when this is its copy)."""
    named = shown or adapter_dir
    record_path = adapter_dir / "training_config.json"
    try:
        record = read_object(record_path) if record_path.is_file() else {}
    except BadLoraFile as exc:
        raise BadLoraFile(str(exc).replace(str(adapter_dir), str(named))) from None
    trained = record.get("model") if isinstance(record.get("model"), str) else None
    if model is not None and trained is not None and model != trained:
        raise TrainedForAModel(
            f"{named}: trained on {trained!r}, not {model!r}: it answers {trained!r}'s turns"
        )
    chosen = model or trained
    if chosen is None:
        if len(settings.models) > 1:
            raise TrainedForAModel(
                f"{named}: its training record does not say which model it was trained on; pass --model"
                f" (one of {', '.join(settings.models)})"
            )
        chosen = settings.model
    if chosen not in settings.models:
        raise TrainedForAModel(
            f"{'--model' if chosen == model else named}: {chosen!r} is not a model this fleet serves"
            f" ({', '.join(settings.models)}: MLCHAT_SERVED_MODELS, else MLCHAT_MODEL)"
        )
    return chosen


def _registered_at(slug: str, target: Path) -> bool:
    """Whether the character's LoRA is the copy at `target` after all (a commit whose answer was lost
    registered it): its folder is then kept. Unknown (the database still away): kept too, an orphan
    copy costing disk where a deleted one would fail every turn of the character."""
    try:
        with session_scope() as session:
            return registered_adapter_path(session=session, slug=slug) == str(target)
    except Exception:
        return True


def _check_adapter(folder: Path, shown: Path) -> None:
    """BadLoraFile unless `folder` holds a PEFT LoRA the engine can load; messages name `shown` (the
    folder the user gave, when `folder` is its copy)."""
    try:
        config_path = folder / "adapter_config.json"
        if not config_path.is_file():
            raise BadLoraFile(f"{folder}: no adapter_config.json (train one with `mlchat lora train`)")
        if not any((folder / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
            raise BadLoraFile(f"{folder}: no adapter weights (adapter_model.safetensors)")
        config = read_object(config_path)
        if config.get("peft_type") != "LORA":
            raise BadLoraFile(f"{folder}: a {config.get('peft_type')} adapter; only LoRA is served")
        rank = config.get("r")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise BadLoraFile(f"{config_path}: r: {json.dumps(rank)[:40]} is not a positive whole number")
        if rank > settings.max_lora_rank:
            raise BadLoraFile(
                f"{folder}: rank {config['r']} is over MLCHAT_MAX_LORA_RANK ({settings.max_lora_rank})"
            )
        refusal = engine_refusal(config, settings.max_lora_rank)
        if refusal is not None:  # registered, every turn of the character was retried for minutes
            raise BadLoraFile(f"{config_path}: the engine would refuse it: {refusal}")
        # Against this host's model where the fleet serves that one alone: with several (compose's
        # three), an adapter is for whichever its character's turns name, and each worker refuses a
        # misfit of its own (review: an adapter for SOLAR was refused on the API's gpt-oss). On a
        # host without the model's folder, the workers check it too.
        model_dir = local_model_dir(settings) if len(settings.models) == 1 else None
        if model_dir is not None:
            misfit = shape_refusal(folder, served_weights(model_dir))
            if misfit is not None:
                raise BadLoraFile(f"{folder}: does not fit the served model ({model_dir}): {misfit}")
    except BadLoraFile as exc:
        raise BadLoraFile(str(exc).replace(str(folder), str(shown))) from None


# What a registered adapter is: what vLLM loads (its config and weights) and the record of whose
# dialogue trained it. Nothing else of the folder is copied (review: a training folder's checkpoints,
# data and logs were copied whole, links followed).
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "adapter_model.pt",
    "training_config.json",
)


def _copy_adapter(adapter_dir: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for name in ADAPTER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copyfile(adapter_dir / name, target / name)


def register(
    slug: str,
    adapter_dir: Path,
    *,
    tenant: str | None = None,
    every_tenant: bool = False,
    model: str | None = None,
) -> Registered:
    """Copy the adapter in and make it the character's, answering `tenant`'s turns alone (served_to
    says whose by default) on `model` alone (served_on says which by default); ValueError
    (BadLoraFile) for a folder that is not a PEFT LoRA the engine can load, one trained on a
    tenant's dialogue asked to serve all unsaid, or one for another model, CharacterNotFound for an
    unknown character."""
    _check_adapter(adapter_dir, adapter_dir)  # refused before a copy is made: an unknown slug costs none
    served_on(adapter_dir, model=model)  # which model's turns (its refusals, before a copy too)
    # The slug names a folder: checked, and the character looked up, before anything is copied (a
    # slug like `../x` wrote outside the adapters folder, an unknown one cost a whole copy first).
    if not character_exists(slug):
        raise CharacterNotFound(f"no character {slug!r}")
    served_to(adapter_dir, tenant=tenant, every_tenant=every_tenant)  # its refusals, before a copy too
    target = adapters_dir() / slug / uuid.uuid4().hex
    try:
        _copy_adapter(adapter_dir, target)
        # What is registered is the copy, checked again as copied: a folder retrained in place while
        # it was copied (its weights and record replaced) is judged by what the workers will load,
        # and whose turns it answers by the record copied with it.
        _check_adapter(target, adapter_dir)
        serving = served_to(target, tenant=tenant, every_tenant=every_tenant, shown=adapter_dir)
        on = served_on(target, model=model, shown=adapter_dir)
        with session_scope() as session:
            superseded = registered_adapter_path(session=session, slug=slug)
            version = register_adapter(session=session, slug=slug, path=str(target), tenant=serving, model=on)
    except BaseException:  # refused, a full disk, the database away: no copy left behind
        if not _registered_at(slug, target):
            shutil.rmtree(target, ignore_errors=True)
        raise
    if version is None:  # removed meanwhile
        shutil.rmtree(target, ignore_errors=True)
        raise CharacterNotFound(f"no character {slug!r}")
    _superseded_now(superseded)
    return Registered(slug, version, target, serving, on)


def _superseded_now(path: str | None) -> None:
    """Stamp a copy no registration names any more with this moment: the sweep removes it a day on
    (remove_superseded counts from its folder's time; review: a copy made ten days before went at the
    next sweep, under a worker still answering a turn claimed with it)."""
    if path is not None:
        with contextlib.suppress(OSError):  # on another host's mount, or gone: nothing to keep
            os.utime(path)


# A copy no registration names is removed by the sweep a day after it was superseded (its folder is
# stamped then; one a failed registration left, a day after it was made): a worker answering a
# turn claimed before its character's adapter changed may still load it meanwhile (and one that cannot
# any more retries the turn, which its next claim answers with the adapter registered then).
SUPERSEDED_AFTER_S = 24 * 3600
_COPY_NAME = re.compile(r"[0-9a-f]{32}")  # register's copies: uuid4().hex


def remove_superseded() -> int:
    """Remove the copies under MLCHAT_ADAPTERS_DIR that no character's registration names (a
    registration since, an unregister, a registration that failed) a day after its folder's time (the
    moment it was superseded: _superseded_now); how many went.
    Matched by the copy's own folder name, which no other registration has: a host that mounts the
    folder elsewhere never removes a registered copy."""
    root = adapters_dir()
    if not root.is_dir():
        return 0
    with session_scope() as session:
        registered = {Path(path).name for path in registered_adapter_paths(session=session)}
    old = time.time() - SUPERSEDED_AFTER_S
    removed = 0
    for character_dir in root.iterdir():
        if character_dir.is_symlink() or not character_dir.is_dir():
            continue
        for copy in character_dir.iterdir():
            if copy.is_symlink() or not copy.is_dir() or not _COPY_NAME.fullmatch(copy.name):
                continue
            if copy.name not in registered and copy.stat().st_mtime < old:
                shutil.rmtree(copy, ignore_errors=True)
                removed += not copy.exists()
    return removed


def unregister(slug: str) -> int | None:
    """Take the character's adapter off: its turns are answered by the base model from the next claim.
    The version taken off, or None if it had none; CharacterNotFound for an unknown character. The
    copy stays on disk a day (the sweep removes it then): a worker answering a turn claimed before
    may still load it."""
    if not character_exists(slug):
        raise CharacterNotFound(f"no character {slug!r}")
    with session_scope() as session:
        superseded = registered_adapter_path(session=session, slug=slug)
        version = unregister_adapter(session=session, slug=slug)
    _superseded_now(superseded if version is not None else None)
    return version
