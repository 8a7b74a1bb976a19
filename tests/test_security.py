"""Security rules that a tool can check: no SQL from strings, secrets only from the environment,
Flower behind basic auth. (API keys: test_http_api.py; a player cannot open a system turn:
test_prompt.py.)"""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from core.settings import PROJECT_ROOT

RUFF = Path(sys.executable).parent / "ruff"
# Every package of the product (review: services/, memory/ and four more were left out, and CI runs
# `make test`, not `make lint`); test_every_package_is_checked keeps the list whole.
SOURCE_DIRS = (
    "api",
    "core",
    "db",
    "memory",
    "migrations",
    "roleplay",
    "scenes",
    "scripts",
    "services",
    "streaming",
    "structured",
    "tasks",
    "worker",
)


def _sql_from_strings(*paths: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(RUFF), "check", "--no-cache", "--select", "S608", "--output-format", "concise", *paths],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        timeout=120,
    )


def test_no_sql_is_built_by_string_formatting() -> None:
    result = _sql_from_strings(*SOURCE_DIRS)
    assert result.returncode == 0, result.stdout


def test_every_package_is_checked() -> None:
    packages = {p.parent.name for p in PROJECT_ROOT.glob("*/__init__.py")} - {"tests"}
    assert packages <= set(SOURCE_DIRS), sorted(packages - set(SOURCE_DIRS))


def test_the_sql_check_catches_a_formatted_query(tmp_path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text('def q(conn, name):\n    return conn.execute(f"SELECT * FROM turns WHERE id = {name}")\n')
    result = _sql_from_strings(str(bad))
    assert result.returncode != 0 and "S608" in result.stdout


def test_compose_takes_every_secret_from_the_environment_and_guards_flower() -> None:
    text = (PROJECT_ROOT / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    flower = compose["services"]["flower"]
    # Credentials from the environment, never on a command line (ps would show them); loopback only.
    assert re.search(
        r"\$\{FLOWER_USER:\?[^}]*\}:\$\{FLOWER_PASSWORD:\?[^}]*\}", flower["environment"]["FLOWER_BASIC_AUTH"]
    )
    for service in compose["services"].values():
        command = " ".join(service.get("command") or [])
        assert "PASSWORD" not in command and "basic-auth" not in command and "API_KEYS" not in command
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    # Each secret is a required variable (${X:?…}): compose refuses to start rather than use a default.
    for secret in ("POSTGRES_PASSWORD", "FLOWER_PASSWORD", "MLCHAT_API_KEYS"):
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?") for u in uses), (secret, uses)
    assert not re.search(r"(?i)password[:=]\s*['\"]?(?!\$\{)\w", text), "a literal password in compose"


def test_the_image_gets_no_local_secrets_and_pinned_hashed_dependencies() -> None:
    ignored = (PROJECT_ROOT / ".dockerignore").read_text().split()
    assert {".env", ".env.*", ".mlchat", ".venv", ".git"} <= set(ignored)
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text()
    assert "COPY . ." not in dockerfile and "--chown" not in dockerfile  # named folders, owned by root
    assert "--require-hashes -r requirements/gpu.lock" in dockerfile
    lock = (PROJECT_ROOT / "requirements" / "gpu.lock").read_text()
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==", lock, flags=re.M)
    assert "vllm" in pins and "celery" in pins and len(pins) > 100
    assert lock.count("--hash=sha256:") >= len(pins)  # every pin carries its hashes


def test_compose_refuses_to_start_flower_with_the_placeholder_password_of_env_example(tmp_path) -> None:
    import os

    example = (PROJECT_ROOT / ".env.example").read_text()
    values = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", example, re.M))
    flower = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())["services"]["flower"]
    shell, flag, script = flower["command"]
    script = script.replace("$$", "$")  # as compose hands it to the container (no interpolation)
    celery = tmp_path / "celery"  # stands in for Flower, which this test does not start
    celery.write_text('#!/bin/sh\necho "flower started: $*"\n')
    celery.chmod(0o755)
    for password, starts in ((values["FLOWER_PASSWORD"], False), ("a-real-secret-4f9c", True)):
        env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "FLOWER_BASIC_AUTH": f"admin:{password}"}
        result = subprocess.run([shell, flag, script], capture_output=True, text=True, env=env, timeout=30)
        assert (result.returncode == 0) == starts, result.stderr
        assert ("flower started: --app=tasks.app flower --port=5555" in result.stdout) == starts
        assert starts or "placeholder" in result.stderr
