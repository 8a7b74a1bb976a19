"""The worker refuses to start when the embedder and the database disagree on the vector size."""

import pytest

from db.introspect import vector_column_dim
from db.session import session_scope
from worker.embedder import EmbedderDimensionError, check_dimension, get_embedder


def test_the_live_schema_and_the_embedder_agree(services) -> None:
    with session_scope() as s:
        assert vector_column_dim(session=s, table="messages", column="embedding") == 384
        assert vector_column_dim(session=s, table="story_events", column="embedding") == 384
    assert get_embedder().get_embedding_dimension() == 384


def test_a_mismatch_is_a_clear_start_up_error(services) -> None:
    with pytest.raises(EmbedderDimensionError, match=r"768-d vectors but the database stores vector\(384\)"):
        check_dimension(768, 384)


def test_an_embedder_of_another_dimension_than_the_setting_names_the_setting(services) -> None:
    """Review: the embedder's check against MLCHAT_EMBEDDING_DIM said the database stored that size,
    sending an operator whose host lacked the setting to pick another embedder or a new database."""
    from core.settings import settings
    from worker.embedder import load_embedder

    with pytest.raises(
        EmbedderDimensionError, match="makes 384-d vectors but MLCHAT_EMBEDDING_DIM is 768: set it"
    ):
        load_embedder(settings.model_copy(update={"embedding_dim": 768}))


def test_a_worker_whose_database_is_away_at_start_says_so_in_one_line(monkeypatch, caplog) -> None:
    """Found in review: a worker whose database was away at start logged "the worker could not
    start" with a psycopg traceback naming a socket, not DATABASE_URL, at every restart."""
    import logging

    import psycopg
    from sqlalchemy.exc import OperationalError

    import worker.__main__ as worker_main
    import worker.startup

    def away() -> None:
        raise OperationalError("SELECT 1", {}, psycopg.OperationalError("connection refused\nIs it running?"))

    monkeypatch.setattr(worker.startup, "check_and_warm_up", away)
    with caplog.at_level(logging.CRITICAL), pytest.raises(SystemExit) as stopped:
        worker_main._warm_up()
    assert stopped.value.code == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert record.getMessage() == (
        "the worker could not start: the database is unreachable (DATABASE_URL; unset: the embedded "
        "server): connection refused"
    )
    assert record.exc_info is None


def test_ctrl_c_in_a_command_says_so(monkeypatch, capsys) -> None:
    """Found in review: Typer turns Ctrl-C into exit code 130 without a word, so `mlchat run submit`
    interrupted said nothing of what was kept or how to go on."""
    import db.runs
    from scripts.cli import main as cli

    def interrupted(**_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(db.runs, "list_runs", interrupted)
    assert cli(["run", "list"]) == 130
    assert capsys.readouterr().err.startswith("mlchat: interrupted; what was stored is kept")


def test_an_engine_step_too_small_for_a_prompt_on_a_cpu_is_one_line_naming_the_variable(monkeypatch) -> None:
    """Review of the settings' check: unset, chunked prefill is vLLM's default, which splits prompts
    on a GPU (taken by the settings) and is off on a CPU; there the engine refused the step's size
    at its start naming its own parameter, in a traceback. It is a BadEngineSetting, one line."""
    from core.settings import settings
    from worker import engine as engine_module

    monkeypatch.setattr(settings, "max_num_batched_tokens", 1024)
    monkeypatch.setattr(settings, "max_model_len", 2048)
    with pytest.raises(
        engine_module.BadEngineSetting, match="^MLCHAT_MAX_NUM_BATCHED_TOKENS must be at least"
    ):
        engine_module.check_engine_step(False)  # a CPU's chunked prefill, unset
    engine_module.check_engine_step(None)  # a GPU's default splits prompts: taken
    engine_module.check_engine_step(True)


@pytest.mark.parametrize(
    "given, variable",
    [
        ({"max_model_len": 9000}, "MLCHAT_MAX_MODEL_LEN"),  # past the bundled model's 8,192
        ({"tensor_parallel_size": 4}, "MLCHAT_TENSOR_PARALLEL_SIZE"),  # 9 heads do not split 4 ways
    ],
)
def test_a_setting_vllm_refuses_is_one_line_naming_its_variable(given, variable) -> None:
    """Found in review: only mlchat's own checks were one line; a setting vLLM refused as its engine
    was built (a MLCHAT_MAX_MODEL_LEN past the model's, a tensor parallel size its heads do not
    split into) ended the worker in vLLM's traceback, restarted in a loop by its supervisor."""
    from vllm.engine.arg_utils import EngineArgs

    from core.settings import settings
    from worker.engine import named_engine_setting
    from worker.model_cache import resolve_model_path

    with pytest.raises(ValueError) as refused:  # vLLM's own refusal, as LLM(...) raises it
        EngineArgs(model=resolve_model_path(settings), **given).create_engine_config()
    named = named_engine_setting(refused.value)
    assert named is not None and str(named).startswith(f"{variable}: the engine refused it: "), named
    assert "\n" not in str(named)
    assert named_engine_setting(ValueError("something else went wrong")) is None


def test_the_engine_load_turns_vllms_refusal_into_that_line(monkeypatch) -> None:
    """The load itself (review: the test above never reached the try around LLM(...)): vLLM's
    refusal, raised where the engine is built, comes out of get_engine as BadEngineSetting."""
    import vllm

    import worker.cpu_affinity
    from worker import engine

    def refuses(**kwargs):  # type: ignore[no-untyped-def]
        from vllm.engine.arg_utils import EngineArgs

        EngineArgs(model=kwargs["model"], max_model_len=9000).create_engine_config()

    monkeypatch.setattr(vllm, "LLM", refuses)
    monkeypatch.setattr(worker.cpu_affinity, "restore_all_cpus", lambda: None)  # this process's own
    with pytest.raises(engine.BadEngineSetting, match=r"^MLCHAT_MAX_MODEL_LEN: the engine refused it: "):
        engine.get_engine.__wrapped__()  # not the session's cached engine


def test_an_engine_core_that_did_not_start_is_one_line_naming_the_settings_to_look_at(monkeypatch) -> None:
    """Review of error texts (stop 79): vLLM's engine core is a child process; what refused it (a
    KV cache the model length does not fit, above all) is logged there, and the parent raised a
    RuntimeError naming no setting: the worker's start was a traceback."""
    import vllm

    import worker.cpu_affinity
    from worker import engine

    def core_failed(**kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}")

    monkeypatch.setattr(vllm, "LLM", core_failed)
    monkeypatch.setattr(worker.cpu_affinity, "restore_all_cpus", lambda: None)  # this process's own
    with pytest.raises(
        engine.BadEngineSetting, match=r"^the engine core did not start .*MLCHAT_MAX_MODEL_LEN"
    ):
        engine.get_engine.__wrapped__()  # not the session's cached engine

    def other(**kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("something else")

    monkeypatch.setattr(vllm, "LLM", other)
    with pytest.raises(RuntimeError, match="^something else$"):
        engine.get_engine.__wrapped__()


def test_sigterm_in_a_command_goes_the_way_of_ctrl_c() -> None:
    """CLI review: SIGTERM (`timeout`, systemd, `docker stop`) killed a command outright, where
    Ctrl-C ran its clean-ups (a submission's private copy, a `.part` file, an inline turn)."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, time, db.runs, scripts.cli as cli\n"
        "def slow(**_):\n"
        "    try:\n"
        "        print('ready', flush=True)\n"  # inside: a signal just after it still cleans up
        "        time.sleep(60)\n"
        "    finally:\n"
        "        print('cleaned up', flush=True)\n"
        "db.runs.list_runs = slow\n"
        "sys.exit(cli.main())\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "run", "list"],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and out.strip() == "cleaned up", (proc.returncode, out, err)
    assert "mlchat: interrupted; what was stored is kept" in err and "Traceback" not in err, err
