"""`mlchat lora register`: a trained adapter becomes a character's voice, one version up.

The adapter folder is copied under MLCHAT_ADAPTERS_DIR (a volume the workers share), so a later
retraining in place never changes what a running worker serves; the worker loads it on demand as
`<slug>@v<version>` and records that name on every turn it answers.
"""

from __future__ import annotations

import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from core.settings import settings
from db.session import session_scope
from db.world import register_adapter
from services.characters import character_exists
from services.lora.files import BadLoraFile, read_object


@dataclass(frozen=True)
class Registered:
    slug: str
    version: int
    path: Path
    tenant: str | None = None  # whose turns it answers (None: every tenant's)


def adapters_dir() -> Path:
    return settings.adapters_dir or settings.state_dir / "adapters"


class TrainedOnATenant(ValueError):
    """An adapter trained on one tenant's dialogue, asked to answer another tenant's turns."""


def served_to(adapter_dir: Path, *, tenant: str | None, every_tenant: bool) -> str | None:
    """Whose turns the adapter answers (None: every tenant's). One trained on a tenant's dialogue (its
    training_config.json, from `mlchat lora train`, says whose) answers that tenant's alone, unless
    `every_tenant` says aloud to serve their players' history to all; never another tenant alone.
    One trained on the card's examples alone, or of no record (trained elsewhere: its provenance is
    the operator's), answers `tenant`'s, or every tenant's."""
    record_path = adapter_dir / "training_config.json"
    record = read_object(record_path) if record_path.is_file() else {}
    trained_on = record.get("tenant") if record.get("from_turns") else None
    if not isinstance(trained_on, str):
        return None if every_tenant else tenant
    if tenant is not None and tenant != trained_on:
        raise TrainedOnATenant(
            f"{adapter_dir}: trained on tenant {trained_on!r}'s dialogue ({record['from_turns']} exchanges), "
            f"not tenant {tenant!r}'s: it answers {trained_on!r}'s turns (or, with --every-tenant, all)"
        )
    return None if every_tenant else trained_on


def register(
    slug: str, adapter_dir: Path, *, tenant: str | None = None, every_tenant: bool = False
) -> Registered:
    """Copy the adapter in and make it the character's, answering `tenant`'s turns alone (served_to
    says whose by default); ValueError for a folder that is not a PEFT LoRA the engine can load or
    one trained on a tenant's dialogue asked to serve all unsaid, KeyError for an unknown character."""
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"{adapter_dir}: no adapter_config.json (train one with `mlchat lora train`)")
    if not any((adapter_dir / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise ValueError(f"{adapter_dir}: no adapter weights (adapter_model.safetensors)")
    config = read_object(config_path)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter_dir}: a {config.get('peft_type')} adapter; only LoRA is served")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise BadLoraFile(f"{config_path}: r: {json.dumps(rank)[:40]} is not a positive whole number")
    if rank > settings.max_lora_rank:
        raise ValueError(
            f"{adapter_dir}: rank {config['r']} is over MLCHAT_MAX_LORA_RANK ({settings.max_lora_rank})"
        )
    # The slug names a folder: checked, and the character looked up, before anything is copied (a
    # slug like `../x` wrote outside the adapters folder, an unknown one cost a whole copy first).
    if not character_exists(slug):
        raise KeyError(f"no character {slug!r}")
    serving = served_to(adapter_dir, tenant=tenant, every_tenant=every_tenant)
    target = adapters_dir() / slug / uuid.uuid4().hex
    try:
        shutil.copytree(adapter_dir, target)
        with session_scope() as session:
            version = register_adapter(session=session, slug=slug, path=str(target), tenant=serving)
    except BaseException:  # a full disk, the database away: no copy left behind
        shutil.rmtree(target, ignore_errors=True)
        raise
    if version is None:  # removed meanwhile
        shutil.rmtree(target, ignore_errors=True)
        raise KeyError(f"no character {slug!r}")
    return Registered(slug, version, target, serving)
