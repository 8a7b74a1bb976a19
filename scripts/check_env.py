"""The environment the `scripts/check_*` fault checks give the worker processes they start."""

from __future__ import annotations

import json
import os


def worker_env(model: str, **extra: str) -> dict[str, str]:
    """This process's environment, pointed at its (embedded) services and the bundled model served
    under `model`, plus `extra` (MLCHAT_* settings of the check)."""
    from core.services import broker_url, database_url
    from core.settings import settings
    from worker.model_cache import BUNDLED_MODEL, ensure_bundled_model

    model_path = settings.model_path or str(ensure_bundled_model(settings.model_cache_dir / BUNDLED_MODEL))
    return (
        os.environ
        | {
            "DATABASE_URL": database_url(),
            "REDIS_URL": broker_url(),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "MLCHAT_MODEL": model,
            "MLCHAT_MODEL_PATH": model_path,
            "MLCHAT_SERVED_MODELS": json.dumps([model]),
            "MLCHAT_METRICS_PORT": "0",
        }
        | extra
    )
