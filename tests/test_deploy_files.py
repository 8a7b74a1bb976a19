"""The deployment files, checked by real tools: hadolint for the Dockerfile, the official compose-spec
JSON schema (check-jsonschema) for docker-compose.yml, and .env.example against the settings."""

import re
import subprocess
import sys
from pathlib import Path

from core.settings import PROJECT_ROOT, Settings

BIN = Path(sys.executable).parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120)


def test_the_dockerfile_passes_hadolint() -> None:
    result = _run(str(BIN / "hadolint"), "--no-color", "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && apt-get install curl\n")
    result = _run(str(BIN / "hadolint"), "--no-color", str(bad))
    assert result.returncode != 0 and "DL3007" in result.stdout  # the checker really checks


def test_the_compose_file_matches_the_compose_spec(tmp_path) -> None:
    check = [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    result = _run(*check, "docker-compose.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "docker-compose.yml"
    text = (PROJECT_ROOT / "docker-compose.yml").read_text()
    broken.write_text(text.replace("    healthcheck:\n      test:", "    healthcheck:\n      tests:", 1))
    assert _run(*check, str(broken)).returncode != 0


def test_compose_runs_every_role_from_one_image() -> None:
    text = (PROJECT_ROOT / "docker-compose.yml").read_text()
    for role in ("migrate:", "worker-", "api:", "sweeper:", "flower:", "postgres:", "redis:"):
        assert f"\n  {role}" in text
    assert "FLOWER_BASIC_AUTH" in text and "pgvector/pgvector" in text and "--appendonly" in text


def test_env_example_lists_every_setting() -> None:
    listed = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (PROJECT_ROOT / ".env.example").read_text(), re.M))
    expected = {f"MLCHAT_{name.upper()}" for name in Settings.model_fields} - {
        "MLCHAT_DATABASE_URL",
        "MLCHAT_REDIS_URL",
    }
    assert expected <= listed, sorted(expected - listed)
