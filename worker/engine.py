"""The vLLM engine: loaded once per worker process, one generate() call per batch."""

from __future__ import annotations

import logging
import multiprocessing.util
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from core.settings import settings
from worker.model_cache import resolve_model_path

if TYPE_CHECKING:
    from vllm import LLM

logger = logging.getLogger(__name__)
_generate_lock = threading.Lock()


@dataclass(frozen=True)
class GenerationRequest:
    token_ids: list[int]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    stop: tuple[str, ...]


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


@dataclass
class LoadedEngine:
    llm: LLM
    tokenizer: Any
    load_ms: float


@cache
def get_engine() -> LoadedEngine:
    """Load the model once per process (vLLM starts its engine-core process here)."""
    # vLLM reads its CPU KV-cache size from the environment; give it ours unless the operator set one.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kvcache_gib))
    from vllm import LLM
    from vllm.platforms import current_platform

    path = resolve_model_path(settings)
    chunked = settings.enable_chunked_prefill
    if chunked is None and current_platform.is_cpu():
        chunked = False
    scheduling: dict[str, Any] = {}
    if chunked is not None:
        scheduling["enable_chunked_prefill"] = chunked
    if settings.max_num_batched_tokens is not None:
        scheduling["max_num_batched_tokens"] = settings.max_num_batched_tokens
    elif chunked is False:
        # A prompt is never split, so one step must hold the longest prompt (and a few more).
        scheduling["max_num_batched_tokens"] = max(4096, settings.max_model_len)
    started = time.perf_counter()
    llm = LLM(
        model=path,
        max_model_len=settings.max_model_len,
        dtype=settings.dtype,
        tensor_parallel_size=settings.tensor_parallel_size,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enable_prefix_caching=settings.enable_prefix_caching,
        seed=settings.engine_seed,
        **scheduling,
    )
    load_ms = (time.perf_counter() - started) * 1000
    logger.info("loaded %s in %.0f ms", path, load_ms)
    # LLM has no public close(). At exit, multiprocessing joins child processes before vLLM's own
    # finalizers run, and anything calling multiprocessing.get_logger() (a Celery worker does)
    # moves that join ahead of every atexit hook: the process would wait forever on the
    # engine-core child. Finalizers with an exit priority run before the join.
    multiprocessing.util.Finalize(None, _shutdown, args=(llm,), exitpriority=100)
    return LoadedEngine(llm, llm.get_tokenizer(), load_ms)


def generate(requests: Sequence[GenerationRequest]) -> list[Generation]:
    """Generate the whole batch in one engine call; one Generation per request, in order."""
    if not requests:
        return []
    from vllm import SamplingParams

    engine = get_engine()
    prompts: list[Any] = [{"prompt_token_ids": r.token_ids} for r in requests]
    params = [
        SamplingParams(
            temperature=r.temperature,
            top_p=r.top_p,
            max_tokens=r.max_tokens,
            seed=r.seed,
            stop=list(r.stop) or None,
            skip_special_tokens=True,
        )
        for r in requests
    ]
    # LLM is not thread-safe: a second thread's generate() would consume this call's outputs and
    # leave it waiting forever. A worker has one thread; in-process callers (tests, serverless) may not.
    with _generate_lock:
        outputs = engine.llm.generate(prompts, params, use_tqdm=False)
    results = []
    for request, out in zip(requests, outputs, strict=True):
        completion = out.outputs[0]
        results.append(
            Generation(
                text=completion.text.strip(),
                prompt_tokens=len(request.token_ids),
                completion_tokens=len(completion.token_ids),
                finish_reason=completion.finish_reason,
            )
        )
    return results


def generate_isolating(requests: Sequence[GenerationRequest]) -> list[Generation | Exception]:
    """One engine call for the batch; if it raises, split the batch in halves and try each, so a
    request that makes vLLM reject the whole call (one poison prompt) fails alone, not its batch-mates.
    Costs nothing when the engine succeeds, and about 2n calls when it is down for everyone."""
    if not requests:
        return []
    try:
        return list(generate(requests))
    except Exception as exc:
        if len(requests) == 1:
            logger.warning("engine failed a request: %r", exc)
            return [exc]
        logger.warning("engine failed a batch of %d; splitting it to find the cause: %r", len(requests), exc)
    half = len(requests) // 2
    return generate_isolating(requests[:half]) + generate_isolating(requests[half:])


def _shutdown(llm: LLM) -> None:
    # At interpreter exit the log streams may already be closed (pytest's capture, for one).
    logging.disable(logging.WARNING)
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if client is not None and hasattr(client, "shutdown"):
        client.shutdown()
