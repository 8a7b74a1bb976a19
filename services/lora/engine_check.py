"""Whether the engine will load an adapter: vLLM's own check of its PEFT config (unsupported
features, a rank over the limit, rank_pattern included), read before the adapter is registered or
loaded, so an adapter the engine refuses is refused by name, never retried as a passing fault."""

from __future__ import annotations

from typing import Any


def engine_refusal(config: dict[str, Any], max_rank: int) -> str | None:
    """Why vLLM refuses an adapter of this adapter_config.json for an engine of `max_rank`; None if it
    takes it. vLLM's checks, not a copy of them: bias, DoRA, PiSSA and LoftQ inits, modules_to_save,
    a missing lora_alpha or target_modules, a rank_pattern entry over the limit."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    engine = LoRAConfig(max_lora_rank=max_rank)  # type: ignore[arg-type]  # outside: vLLM's own fault raises
    try:
        PEFTHelper.from_dict(dict(config)).validate_legal(engine)
    except ValueError as exc:
        return str(exc)[:500]
    except (TypeError, AttributeError, KeyError) as exc:  # a field of another type (`rank_pattern` a list)
        return f"{type(exc).__name__}: {str(exc)[:500]}"
    return None
