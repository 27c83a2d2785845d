# The two set-up commands: `make serve` and `make test`. Each creates or reuses .venv itself.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
MODEL ?= models/default
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test fuzz bench soak install browser deploy-tools

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[convert,test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m serving --model $(MODEL) --host $(HOST) --port $(PORT)

# The servers the tests start write their packed weights (model/packed_cache.py) here, not into the user's cache.
test: $(STAMP) browser deploy-tools cross-tools
	GPT2_PACKED_CACHE=$${GPT2_PACKED_CACHE:-$(CURDIR)/.cache/test-packed} $(PY) -m pytest -q $(PYTEST_ARGS)

# tests/test_ui.py drives the web playground in headless Chromium. Missing, it is installed with apt-get when we are
# root (CI's fresh machine); otherwise this says what to install (the test fails without it, it is never skipped).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver for tests/test_ui.py"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
	      || echo "could not install chromium: tests/test_ui.py will fail"; \
	  else \
	    echo "tests/test_ui.py needs Chromium: sudo apt-get install chromium chromium-driver"; \
	  fi; \
	fi

# tests/test_deploy.py runs deploy/'s nginx and Prometheus configs with the real programs (Debian's nginx and
# prometheus: ~21 MB of downloads, ~25 s) (the Kubernetes manifests are checked with kubernetes-validate, from the test extra). Missing, they
# are installed when we are root (RUNLEVEL=1: the packages' system services are not started); otherwise this says
# what to install (the loopback stack test fails without them, it is never skipped).
deploy-tools:
	@if ! command -v nginx >/dev/null || ! command -v prometheus >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing nginx and prometheus for tests/test_deploy.py"; \
	    { apt-get update -qq && RUNLEVEL=1 DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        nginx prometheus >/dev/null; } || echo "could not install nginx/prometheus: tests/test_deploy.py will fail"; \
	  else \
	    echo "tests/test_deploy.py needs nginx and prometheus: sudo apt-get install nginx prometheus"; \
	  fi; \
	fi

# tests/test_kernels_cross.py builds the CPU kernels for ARM (aarch64, NEON) and runs them under qemu-user (Debian's
# gcc-aarch64-linux-gnu and qemu-user: ~50 MB of downloads), and builds their AVX-512 branches with SIMDe's
# definitions of the 512-bit intrinsics (Debian's libsimde-dev, headers only: ~1 MB) where the CPU has no AVX-512.
# Missing, they are installed when we are root; otherwise this says what to install (those tests fail without them,
# they are never skipped).
.PHONY: cross-tools
cross-tools:
	@if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64 >/dev/null \
	    || [ ! -f /usr/include/simde/x86/avx512.h ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing gcc-aarch64-linux-gnu, qemu-user and libsimde-dev for tests/test_kernels_cross.py"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user libsimde-dev >/dev/null; } \
	      || echo "could not install the cross tools or libsimde-dev: tests/test_kernels_cross.py will fail"; \
	  else \
	    echo "tests/test_kernels_cross.py needs: sudo apt-get install gcc-aarch64-linux-gnu qemu-user libsimde-dev"; \
	  fi; \
	fi

# The schema fuzz test (tests/test_fuzz.py) at thousands of requests: FUZZ_EXAMPLES generated per operation and
# mode, plus schemathesis's coverage phase (boundary values of every documented range). `make fuzz FUZZ_SEED=7`
# fuzzes with another seed.
FUZZ_EXAMPLES ?= 300
FUZZ_SEED ?= 20261207
fuzz: $(STAMP)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SEED=$(FUZZ_SEED) FUZZ_COVERAGE=1 $(PY) -m pytest -q tests/test_fuzz.py $(PYTEST_ARGS)

# Hugging Face's pure-Python GPT2Tokenizer (the tokenizer benchmark's reference) exists only in transformers 4.x,
# while the tests use 5.x: the benchmark loads 4.x from its own folder.
HF4 := .cache/hf4
$(HF4):
	$(PY) -m pip install -q --target $(HF4) 'transformers>=4.44,<5'

# Every benchmark, one table (bench/results/latest.md and .json), with transformers and llama.cpp measured in the
# same run as references. llama.cpp is built on first use from llama-cpp-python's vendored source, for this CPU
# (~6-15 min on 2 cores; needs cmake and a C++ compiler, cmake from PyPI if missing), and cached in
# ~/.cache/gpt2-mindspore/llama.cpp. `make bench BENCH_ARGS=--quick` is a smoke run; BENCH_ARGS=--no-llama-cpp
# leaves llama.cpp out, BENCH_ARGS="--only llama-cpp" runs llama.cpp alone; `python bench/run_all.py --help`.
bench: $(STAMP) $(HF4)
	$(PY) bench/run_all.py --hf-python-site $(HF4) $(BENCH_ARGS)

# The larger GPT-2s (random weights), each against transformers and llama.cpp in the same run:
# bench/results/latest-gpt2-medium.md etc. Hours on 2 cores; GPT-2 1.5B needs ~16 GB of memory.
# `make bench-large LARGE_PRESETS=gpt2-medium`.
LARGE_PRESETS ?= gpt2-medium gpt2-large gpt2-xl
bench-large: $(STAMP)
	for p in $(LARGE_PRESETS); do $(PY) bench/run_all.py --preset $$p $(BENCH_ARGS) || exit 1; done

# Soak: 32 streaming clients for 10 minutes with disconnects mixed in, against MODEL; errors, RSS over time and
# leaked slots (bench/results/soak-latest.json). `make soak SOAK_ARGS="--clients 8 --duration 60"`.
soak: $(STAMP)
	$(PY) bench/soak.py --model $(MODEL) $(SOAK_ARGS)
