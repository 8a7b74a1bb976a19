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

from core import metrics
from core.settings import Dtype, settings
from worker.model_cache import resolve_model_path

if TYPE_CHECKING:
    from vllm import LLM

logger = logging.getLogger(__name__)
_generate_lock = threading.Lock()


class EngineDead(RuntimeError):
    """vLLM's engine core is gone (out of memory, a device fault, killed): nothing this process
    generates can succeed any more. No request is at fault; the worker hands its turns back and exits
    so that its supervisor starts a fresh one."""


_dead: list[BaseException] = []  # the engine's death, once seen


def engine_dead() -> BaseException | None:
    """The error that killed this process's engine, or None while it is alive (or not loaded)."""
    return _dead[0] if _dead else None


def _is_engine_death(exc: BaseException) -> bool:
    from vllm.v1.engine.exceptions import EngineDeadError

    return isinstance(exc, EngineDeadError)


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


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not readable)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def resolve_dtype(configured: Dtype, on_cpu: bool) -> Dtype:
    """The dtype to load: `auto` on a CPU is bfloat16 only where it is native, float32 elsewhere."""
    if configured != "auto" or not on_cpu:
        return configured
    return "bfloat16" if cpu_flags() & {"avx512_bf16", "amx_bf16"} else "float32"


@cache
def get_engine() -> LoadedEngine:
    """Load the model once per process (vLLM starts its engine-core process here)."""
    # vLLM reads its CPU KV-cache size from the environment; give it ours unless the operator set one.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kvcache_gib))
    # vLLM 0.32's AOT compile cache fails to load what it saved ("'function' object has no attribute
    # 'finalize_loading'") and recompiles on every start (~90 s here); its inductor cache loads fine
    # (~35 s to ready). The operator may set it back.
    os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
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
        dtype=resolve_dtype(settings.dtype, current_platform.is_cpu()),
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
    metrics.ENGINE_UP.set(1)
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
        if _dead:
            raise EngineDead(f"the engine died earlier: {_dead[0]!r}")
        try:
            outputs = _generate_watched(engine.llm, prompts, params)
        except Exception as exc:
            if _is_engine_death(exc):
                _dead.append(exc)
                metrics.ENGINE_UP.set(0)
                logger.error("the engine core died: %r", exc)
                raise EngineDead(f"the engine core died: {exc!r}") from exc
            raise
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


def _generate_watched(llm: LLM, prompts: list[Any], params: list[Any]) -> list[Any]:
    """llm.generate, in a thread watched for the engine core's death.

    vLLM 0.32's synchronous client never wakes a generate() that is waiting for outputs when its
    engine-core process dies: its monitor thread marks the engine dead and shuts the client down,
    but nothing reaches the output queue, so the call blocks for ever. The caller waits here instead
    and raises vLLM's EngineDeadError as soon as the client says the core is gone (the stuck thread
    is a daemon; the worker exits soon after, see worker/lifecycle.py).
    """
    from vllm.v1.engine.exceptions import EngineDeadError

    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def run() -> None:
        try:
            outcome["outputs"] = llm.generate(prompts, params, use_tqdm=False)
        except BaseException as exc:  # handed to the caller's thread as it is
            outcome["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=run, name="vllm-generate", daemon=True).start()
    while not finished.wait(0.5):
        if _core_reported_dead(llm):
            raise EngineDeadError()
    if "error" in outcome:
        raise outcome["error"]
    return list(outcome["outputs"])


def _core_reported_dead(llm: LLM) -> bool:
    # The client's own liveness flag (set by its engine-core monitor); absent means "no news".
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    return bool(getattr(getattr(client, "resources", None), "engine_dead", False))


def generate_isolating(requests: Sequence[GenerationRequest]) -> list[Generation | Exception]:
    """One engine call for the batch; if it raises, split the batch in halves and try each, so a
    request that makes vLLM reject the whole call (one poison prompt) fails alone, not its batch-mates.
    Costs nothing when the engine succeeds. A dead engine (EngineDead) is raised at once: no request
    is at fault."""
    if not requests:
        return []
    try:
        return list(generate(requests))
    except EngineDead:
        raise  # nobody's fault, and every half would fail too
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
