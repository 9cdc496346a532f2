# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEFAULT_MODEL_DIR := build/models/default
MODEL_DIR ?= $(DEFAULT_MODEL_DIR)
# Empty = the server's default runtime (llmserve/engine/config.py: onnxruntime).
RUNTIME ?=
GRPC_PORT ?= 8001
HTTP_PORT ?= 8000
METRICS_PORT ?= 8002
# The front end (OpenAI, TGI and WebSocket APIs, the chat page); empty = tritonserver alone.
OPENAI_PORT ?= 9000
# With the front end, tritonserver listens on 127.0.0.1 only, its admin protocols behind a key written
# to ADMIN_KEY_FILE (empty = build/run/triton-admin-key); OPEN_TRITON=1 leaves it open to all.
OPEN_TRITON ?=
ADMIN_KEY_FILE ?=
# The front end's API key(s) and TLS; API_KEY reaches it as $$LLMSERVE_API_KEY, never on a command line.
API_KEY ?=
API_KEYS_FILE ?=
SSL_CERTFILE ?=
SSL_KEYFILE ?=
PYTEST_ARGS ?=
PRECISION ?=

# Nothing may be fetched from a model hub: everything is local.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install model engine serve test system-packages bench bench-priority bench-openloop loadtest loadtest-goodput clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

# Builds the default model once; the script returns at once when it is already built.
model: install
	$(PY) tools/build_default_model.py --out $(DEFAULT_MODEL_DIR)

# The compiled model RUNTIME loads (build/compiled/); returns at once when it is up to date
# (RUNTIME=torch loads the Hugging Face weights: nothing to compile).
engine: install model
	$(PY) -m llmserve.export $(if $(RUNTIME),--runtime $(RUNTIME)) --model-dir $(MODEL_DIR) $(if $(PRECISION),--precision $(PRECISION))

# The launcher's flags from the variables above, only those set.
SERVE_FLAGS = $(if $(RUNTIME),--runtime $(RUNTIME)) --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) \
	--metrics-port $(METRICS_PORT) $(if $(OPENAI_PORT),--openai-port $(OPENAI_PORT)) \
	$(if $(OPEN_TRITON),--open-triton) $(if $(ADMIN_KEY_FILE),--admin-key-file $(ADMIN_KEY_FILE)) \
	$(if $(API_KEYS_FILE),--api-keys-file $(API_KEYS_FILE)) \
	$(if $(SSL_CERTFILE),--ssl-certfile $(SSL_CERTFILE)) $(if $(SSL_KEYFILE),--ssl-keyfile $(SSL_KEYFILE))

ifneq ($(API_KEY),)
serve: export LLMSERVE_API_KEY := $(API_KEY)
endif
serve: install model engine
	$(PY) -m llmserve.triton.launcher --model-dir $(MODEL_DIR) $(strip $(SERVE_FLAGS))

# Debian's chromium, chromedriver (the chat page's browser test) and prometheus (the monitoring test),
# as root with apt; else those tests skip with the reason.
system-packages:
	sh tools/install_system_packages.sh

test: install model system-packages
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

# Closed-loop benchmark against the peers (llama.cpp, vLLM CPU, transformers serve; set up under build/peers/
# on first use): writes build/bench/results.{json,md,png}. Not part of `make test`.
BENCH_ARGS ?=
bench: install model
	$(PY) -m bench --model-dir $(MODEL_DIR) $(BENCH_ARGS)

# High-priority TTFT under low-priority overload (docs/benchmarking.md#priority-scheduling): build/bench/priority.{json,md}.
PRIORITY_BENCH_ARGS ?=
bench-priority: install model
	$(PY) -m bench.priority --model-dir $(MODEL_DIR) $(PRIORITY_BENCH_ARGS)

# Open loop (Poisson arrivals) on realistic workloads, goodput under an SLO, the same peers:
# build/bench/openloop.{json,md} and openloop-<workload>.png.
OPENLOOP_BENCH_ARGS ?=
bench-openloop: install model
	$(PY) -m bench.openloop --model-dir $(MODEL_DIR) $(OPENLOOP_BENCH_ARGS)

# Locust over the gRPC stream, headless: writes build/loadtest/ (locust CSVs, report.html, summary.md).
# Starts a server on free ports unless HOST=host:port names a running one (METRICS_URL: its metrics).
# SHAPE=step (or `make loadtest-goodput`): +STEP_USERS every STEP_TIME s until TTFT p95 > TTFT_P95_MS;
# goodput in build/loadtest/goodput.json. Unset step variables take loadtest/defaults.py's values.
USERS ?= 16
SPAWN_RATE ?= 4
DURATION ?= 60s
SHAPE ?= constant
LOADTEST_ARGS ?=
loadtest: install model $(if $(HOST),,engine)
	$(PY) -m loadtest.run --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) --shape $(SHAPE) \
		--model-dir $(MODEL_DIR) $(if $(RUNTIME),--runtime $(RUNTIME)) $(if $(HOST),--host $(HOST)) \
		$(if $(METRICS_URL),--metrics-url $(METRICS_URL)) \
		$(if $(STEP_USERS),--step-users $(STEP_USERS)) $(if $(STEP_TIME),--step-time $(STEP_TIME)) \
		$(if $(TTFT_P95_MS),--ttft-p95-ms $(TTFT_P95_MS)) $(LOADTEST_ARGS)

loadtest-goodput:
	$(MAKE) loadtest SHAPE=step

clean:
	rm -rf build/run build/bench build/loadtest
