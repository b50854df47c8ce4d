# MarrowScope: `make demo` runs the pipeline on embedded defaults, `make test` runs the tests.
# Both bootstrap .venv on a machine that has only Python 3.11 and pip.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

export OMP_NUM_THREADS ?= 2
export PYTHONPATH := $(CURDIR)

.PHONY: setup sysdeps test demo real serve lint docs bench protos lock mlflow loadtest clean

$(STAMP): requirements.in constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" wheel setuptools
	$(PIP) install -r requirements.in -c constraints.txt
	$(PIP) install --no-deps -e .
	@touch $(STAMP)

setup: $(STAMP) protos sysdeps

# System tools the tests use, each installed with apt only where it is missing:
# poppler-utils (pdftoppm, pdftotext, pdfimages, pdffonts) reads the PDF report as a person
# would; Debian's chromium is the browser Playwright drives in tests/browser (Playwright's own
# browser downloads are never used). Setup never fails on a machine without apt or root: the
# tests that need a missing tool skip with the reason (under CI=true the browser tests fail
# instead, see tests/ci_skips.py).
SYSDEPS_MISSING = $(strip $(if $(shell command -v pdftoppm),,poppler-utils) \
	$(if $(shell command -v chromium),,chromium))
sysdeps:
	@if [ -z "$(SYSDEPS_MISSING)" ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "sysdeps: no apt-get; install $(SYSDEPS_MISSING) by hand (their tests skip)"; \
	elif [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq $(SYSDEPS_MISSING)) || echo "sysdeps: apt-get failed for $(SYSDEPS_MISSING) (their tests skip)"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		(sudo apt-get update -qq && sudo apt-get install -y -qq $(SYSDEPS_MISSING)) || echo "sysdeps: apt-get failed for $(SYSDEPS_MISSING) (their tests skip)"; \
	else \
		echo "sysdeps: not root and no sudo; apt-get install $(SYSDEPS_MISSING) (their tests skip)"; \
	fi

# OIP and gateway stubs are generated, not committed (grpcio-tools pins protobuf codegen).
protos: $(STAMP)
	$(PY) -m services.runtime.codegen

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m training.demo

# The real-data model set (../shared/data): trained, registered and promoted under
# $(REAL_WORKDIR); REAL_BUDGET=ci for seconds-long runs. Serve it: make serve SERVE_WORKDIR=.real
REAL_WORKDIR ?= .real
REAL_BUDGET ?= cpu
real: setup
	$(PY) -m training.real --workdir $(REAL_WORKDIR) --budget $(REAL_BUDGET)

# The promoted models of $(SERVE_WORKDIR) (the demo's, or .real) as a running stack
# (gateway on :8080) until Ctrl-C.
SERVE_WORKDIR ?= .demo
serve: setup
	$(PY) -m training.serve --workdir $(SERVE_WORKDIR)

# mypy's paths and strictness are in pyproject.toml ([tool.mypy]); .pre-commit-config.yaml
# runs the same three checks. The first mypy run builds .mypy_cache (minutes); later runs
# take seconds.
lint: setup
	$(VENV)/bin/ruff check marrowscope services training tests bench loadtests k8s tools
	$(VENV)/bin/ruff format --check marrowscope services training tests bench loadtests k8s mlflow tools
	$(VENV)/bin/mypy

# Rewrite the generated tables in docs/ (tests/tools/test_docgen.py fails when they are stale).
docs: setup
	$(PY) -m tools.docgen

bench: setup
	$(PY) -m bench.run
	$(PY) -m bench.slide_throughput --out bench/results
	$(PY) -m bench.pipeline_load --out bench/results

loadtest: setup
	$(PY) -m loadtests.run

mlflow: setup
	bash mlflow/run-local.sh

# Re-pin every transitive dependency after changing requirements.in.
lock: $(STAMP)
	$(PIP) freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
