"""The deployment files, checked by real tools: hadolint for the Dockerfile, the official compose-spec
JSON schema (check-jsonschema) for docker-compose.yml, and .env.example against the settings."""

import json
import re
import subprocess
import sys
from pathlib import Path

from core.settings import PROJECT_ROOT, Settings, settings

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


def test_every_package_of_the_product_is_installed_and_copied_into_the_image() -> None:
    """Found this stop: `memory`, `scenes` and `structured` were missing from pyproject's packages and,
    with `streaming`, from both stages of the Dockerfile, so the image's worker and API could not
    import them (the suite runs from the source tree and never noticed)."""
    import tomllib

    from setuptools import find_namespace_packages

    packages = {d.name for d in PROJECT_ROOT.iterdir() if (d / "__init__.py").is_file()} - {"tests"}
    assert {"core", "worker", "memory", "streaming"} <= packages
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    # Review (stop 75): a `packages` list installs the names given, not their subpackages: a wheel
    # held no services.lora, api.routes or worker.prompt, and `mlchat` in the image failed.
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    installed = set(find_namespace_packages(where=str(PROJECT_ROOT), include=include))
    every = {
        ".".join(init.parent.relative_to(PROJECT_ROOT).parts)
        for name in packages
        for init in (PROJECT_ROOT / name).rglob("__init__.py")
    }
    assert {"services.lora", "api.routes", "worker.prompt", "services.runs"} <= every
    assert every - installed == set(), sorted(every - installed)
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text(encoding="utf-8")
    stages = {
        m[1]: m[2] for m in re.finditer(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", dockerfile, re.M | re.S)
    }
    for stage in ("build", "runtime"):
        copied = set(re.findall(r"^COPY (\w+) \./(\w+)$", stages[stage], re.M))
        assert packages - {name for name, into in copied if name == into} == set(), stage


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


def test_every_role_of_the_compose_file_embeds_with_the_workers_embedder() -> None:
    """Found in review: the API had no MLCHAT_EMBEDDER, so it embedded with the bundled default while
    the workers used another model: every fact write and desk edit was refused (503) against the
    stored vectors. And its default model had no path, so the desk could not load its tokenizer."""
    import yaml

    services = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())["services"]
    app_roles = {
        name: s["environment"] for name, s in services.items() if "DATABASE_URL" in s.get("environment", {})
    }
    assert {"api", "sweeper", "worker-gpt-oss-20b", "worker-solar-10.7b"} <= set(app_roles)
    embedders = {name: env.get("MLCHAT_EMBEDDER") for name, env in app_roles.items()}
    assert len(set(embedders.values())) == 1 and None not in embedders.values(), embedders
    worker = services[f"worker-{services['api']['environment']['MLCHAT_MODEL']}"]["environment"]
    assert services["api"]["environment"].get("MLCHAT_MODEL_PATH") == worker["MLCHAT_MODEL_PATH"]
    # Found in review: the dimension was not passed beside the embedder (.env reaches no container
    # but through a name compose gives): an embedder set in .env met 384-wide columns.
    dims = {name: env.get("MLCHAT_EMBEDDING_DIM") for name, env in app_roles.items()}
    assert len(set(dims.values())) == 1 and None not in dims.values(), dims


def test_compose_passes_each_secret_setting_to_the_api() -> None:
    """Found in review: MLCHAT_DESK_SECRET, listed in .env.example, reached no container (compose
    passes .env's values only through the names it gives): a desk of hashed keys refused every login."""
    import yaml

    services = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())["services"]
    secrets = [
        f"MLCHAT_{name.upper()}"
        for name, field in Settings.model_fields.items()
        if "SecretStr" in str(field.annotation)
    ]
    assert {"MLCHAT_CALLBACK_SECRET", "MLCHAT_DESK_SECRET"} <= set(secrets)
    missing = [name for name in secrets if name not in services["api"]["environment"]]
    assert not missing, missing


def test_compose_gives_workers_time_to_stop_and_every_role_the_env_file() -> None:
    """Found in review: a worker's stop was Docker's 10 s before SIGKILL (a bulk batch cut mid-way),
    settings put in .env reached no container, and the sweeper carried the worker's health check
    (a metrics port it never serves: unhealthy for ever)."""
    import yaml

    services = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    assert len(workers) == 3
    for name, worker in workers.items():
        grace = worker.get("stop_grace_period", "10s")
        seconds = int(grace[:-1]) * {"s": 1, "m": 60, "h": 3600}[grace[-1]]
        assert seconds >= settings.lease_seconds, (name, grace)
    app_roles = [s for s in services.values() if "DATABASE_URL" in s.get("environment", {})]
    shared = {"path": "mlchat.env", "required": False}
    assert app_roles and all(s.get("env_file") == [shared] for s in app_roles)
    # Not .env, whose secrets would reach every container: each is passed to the roles that need it
    assert all(s.get("env_file") in (None, [shared]) for s in services.values())
    assert services["sweeper"]["healthcheck"] == {"disable": True}
    # review (stop 76): a stop mid-sweep waits for the pass, which Docker's 10 s cut short
    assert services["sweeper"].get("stop_grace_period") == "5m"
    # review (stop 76): workers counted only their own model as served, so a memory job of a
    # conversation whose newest turn was another model's went to their own queue and weights
    served = services["api"]["environment"]["MLCHAT_SERVED_MODELS"]
    assert all(w["environment"].get("MLCHAT_SERVED_MODELS") == served for w in workers.values())


def test_each_gpu_worker_reserves_its_own_card_with_room_to_share_memory() -> None:
    """Found in review: `count: 1` gives every service device 0 (Docker counts from 0), so a second
    model's engine met the first's on one card and failed at start; and Docker's 64 MB /dev/shm is
    too small for vLLM's engine processes and NCCL."""
    import yaml

    services = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    cards = []
    for name, service in workers.items():
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert "count" not in device and len(device["device_ids"]) == 1, name
        cards.append(device["device_ids"][0])
        assert service["shm_size"] == "16gb", name
    assert len(set(cards)) == len(workers) == 3, cards  # each its own default card


def test_the_image_can_compile_the_engines_kernels_and_keeps_its_caches() -> None:
    """Found in review: Triton compiles vLLM's GPU kernels when the engine first runs and needs a C
    compiler and Python's headers, which the runtime image lacked; its CUDA base (12.8) was not the
    locked torch's CUDA (13); and the compile caches lived in the container's layer."""
    dockerfile = (PROJECT_ROOT / "Dockerfile").read_text(encoding="utf-8")
    lock = (PROJECT_ROOT / "requirements" / "gpu.lock").read_text(encoding="utf-8")
    (cuda_major,) = set(re.findall(r"^cuda-toolkit==(\d+)\.", lock, re.M))
    base = rf"^FROM nvidia/cuda:{cuda_major}\.\d+\.\d+-base-ubuntu24\.04 AS base$"
    assert re.search(base, dockerfile, re.M)
    for package in ("gcc", "libc6-dev", "python3.12-dev"):
        assert re.search(rf"apt-get install [^\n]*\b{re.escape(package)}\b", dockerfile), package
    for cache in ("VLLM_CACHE_ROOT", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert f"{cache}=/models/" in dockerfile, cache


def test_the_gpu_lock_pins_every_dependency_of_the_project_within_its_range() -> None:
    """Review (stop 75): the lock predated `peft` in pyproject, and the image installs the lock, then
    the project without its dependencies: `mlchat lora train` failed in the image only."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = (PROJECT_ROOT / "requirements" / "gpu.lock").read_text(encoding="utf-8")
    pinned = {canonicalize_name(n): v for n, v in re.findall(r"^([A-Za-z0-9._-]+)==([^ \\\n]+)", lock, re.M)}
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    for line in pyproject["project"]["dependencies"]:
        wanted = Requirement(line)
        if wanted.marker is not None and not wanted.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(wanted.name)
        assert name in pinned, f"{wanted.name}: not in requirements/gpu.lock"
        assert wanted.specifier.contains(pinned[name], prereleases=True), (wanted, pinned[name])


def test_the_image_runs_its_own_code_and_reports_no_usage() -> None:
    """Review (stop 75): the `mlchat` console script imported the installed copy (without alembic.ini
    or the migrations), and vLLM's GPU worker reports its host to stats.vllm.ai unless told not to."""
    runtime = _runtime_stage()
    for setting in ("PYTHONPATH=/app", "VLLM_NO_USAGE_STATS=1", "DO_NOT_TRACK=1"):
        assert re.search(rf"^ENV [^\n]*\b{re.escape(setting)}\b", runtime, re.M), setting
    makefile = (PROJECT_ROOT / "Makefile").read_text(encoding="utf-8")
    assert "export VLLM_NO_USAGE_STATS := 1" in makefile


def test_env_example_lists_every_setting() -> None:
    listed = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", (PROJECT_ROOT / ".env.example").read_text(), re.M))
    expected = {f"MLCHAT_{name.upper()}" for name in Settings.model_fields} - {
        "MLCHAT_DATABASE_URL",
        "MLCHAT_REDIS_URL",
    }
    assert expected <= listed, sorted(expected - listed)


def _runtime_stage() -> str:
    text = (PROJECT_ROOT / "Dockerfile").read_text()
    return text[text.index("AS runtime") :].replace("\\\n", " ")


def test_every_volume_the_services_mount_is_made_and_owned_by_the_runtime_user() -> None:
    import yaml

    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    targets = {v.split(":")[1] for v in compose["x-app"]["volumes"]}
    stage = _runtime_stage()
    user = re.search(r"^USER (\S+)", stage, re.M)
    assert user is not None
    before_user = stage[: user.start()]
    made = " ".join(re.findall(r"mkdir -p ([^&\n]+)", before_user)).split()
    owned = re.findall(rf"chown {user.group(1)}:\S+ ([^&\n]+)", before_user)
    owned_paths = " ".join(owned).split()
    volumes = re.search(r"^VOLUME (\[.*\])", stage, re.M)
    assert volumes is not None
    declared = set(json.loads(volumes.group(1)))
    assert targets  # the mounts are read from compose, not listed here
    for target in targets:
        assert target in made and target in owned_paths, f"{target} is not made and owned by {user.group(1)}"
        assert target in declared, f"{target} is not a VOLUME of the image"


def test_the_placeholders_of_env_example_refuse_to_start(tmp_path) -> None:
    example = (PROJECT_ROOT / ".env.example").read_text()
    values = dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(.*)$", example, re.M))
    database = f"postgresql://mlchat:{values['POSTGRES_PASSWORD']}@postgres:5432/mlchat"  # as compose does
    for variable, value in (("MLCHAT_API_KEYS", values["MLCHAT_API_KEYS"]), ("DATABASE_URL", database)):
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT), variable: value}
        result = subprocess.run(
            [sys.executable, "-c", "import core.settings"],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
        )  # fmt: skip
        assert result.returncode != 0
        assert result.stderr.count("\n") == 1 and variable in result.stderr, result.stderr


def _compose_services() -> dict:
    import yaml

    return yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())["services"]


def _shell_of(service: dict) -> str:
    """The `sh -c` script of a service's command, as compose hands it to the shell ($$ is $)."""
    command = service["command"]
    assert command[:2] == ["sh", "-c"], command
    return command[2].replace("$$", "$")


def test_flower_gets_the_broker_and_refuses_a_comma_in_its_login(tmp_path) -> None:
    """Found in review: Flower inherited the app roles' environment (the database's password, the
    callback secret every tenant's signing secret derives from), and Flower splits FLOWER_BASIC_AUTH
    on ',': a password `Xy7,q` made `q` a login of its own."""
    flower = _compose_services()["flower"]
    env = flower["environment"]
    assert "REDIS_URL" in env and "DATABASE_URL" not in env and "MLCHAT_CALLBACK_SECRET" not in env
    script = _shell_of(flower).replace("exec celery", "exit 0; celery")
    for auth, code in (("admin:Xy7,q", 1), ("admin:change-me", 1), ("admin:Xy7q", 0)):
        done = subprocess.run(
            ["sh", "-c", script], env={"PATH": "/usr/bin:/bin", "FLOWER_BASIC_AUTH": auth},
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == code, (auth, done.stderr)


def test_the_sweeper_stops_on_sigterm_between_sweeps() -> None:
    """Found in review: the sweeper's shell, process 1 of its container, ignored SIGTERM: every
    `docker stop` waited its 10 s and killed it, mid-sweep."""
    import signal
    import time

    script = _shell_of(_compose_services()["sweeper"]).replace("python -m scripts.cli sweep", "true")
    shell = subprocess.Popen(["sh", "-c", script])
    try:
        time.sleep(0.5)  # in its sleep between sweeps
        shell.send_signal(signal.SIGTERM)
        assert shell.wait(timeout=5) == 0
    finally:
        shell.kill()
