# dmcall — see README.md. Every target sets up the virtual environment it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: run test lint token venv clean loadtest bench-policy machine machine-browser

# What the machine needs (Debian packages, RabbitMQ and Redis running): tools/machine.sh,
# the one place that installs and starts it; it stops with the exact command when it can't.
machine:
	@PYTHON=$(PYTHON) bash tools/machine.sh

machine-browser:
	@PYTHON=$(PYTHON) bash tools/machine.sh --browser

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

venv: $(STAMP)

run: machine $(STAMP) ## start RabbitMQ/Redis if needed, all services, the web client; seed demo users
	$(PY) -m tools.run

test: machine-browser $(STAMP) ## the whole test suite against real RabbitMQ, Redis and processes
	$(PY) -m tools.test $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check shared services tools tests
	$(VENV)/bin/ruff format --check shared services tools tests
	$(VENV)/bin/mypy

loadtest: machine $(STAMP) ## load the services (started on free ports unless URLs given): make loadtest LOADTEST_ARGS="--rate 200 --duration 60"
	$(PY) -m tools.loadtest $(LOADTEST_ARGS)

.PHONY: bench-signaling
bench-signaling: machine $(STAMP) ## signaling figures: ring, accept, missed lateness (PAIRS=40)
	$(PY) -m tools.loadtest.bench_signaling --pairs $(or $(PAIRS),40)

.PHONY: vapid-key
vapid-key: $(STAMP) ## print a new VAPID key pair for Web Push (VAPID_PRIVATE_KEY=...)
	@$(PY) -m tools.vapid

token: $(STAMP) ## make token USER=alice [SCOPE=platform]
	@DMCALL_ENV=$${DMCALL_ENV:-development} $(PY) -m tools.token "$(USER)" $(if $(SCOPE),--scope "$(SCOPE)")

.PHONY: bench-notifications
bench-notifications: machine $(STAMP) ## call_ringing -> SSE / webhook latency; BENCH_ARGS="--events 1000 --rate 200"
	$(PY) -m tools.loadtest.bench_notifications $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .run artifacts

.PHONY: k8s-render k8s-check
OVERLAY ?= dev
K8S_DIR = deploy/k8s/$(if $(filter base,$(OVERLAY)),base,overlays/$(OVERLAY))

k8s-render: $(STAMP) ## print the manifests of OVERLAY=dev|prod|base, rendered offline
	@$(PY) -m tools.kustomize $(K8S_DIR)

k8s-check: $(STAMP) ## render OVERLAY=dev|prod and check it offline (schemas, wiring, settings)
	$(PY) -m tools.deploy_check $(K8S_DIR)

bench-policy: machine $(STAMP) ## permission queries/s and p50/p99 over HTTP, decisions/s in-process
	$(PY) -m tools.loadtest.bench_policy $(BENCH_ARGS)

.PHONY: test-browser
test-browser: machine-browser $(STAMP) ## the web client in Debian's Chromium against the real services
	$(PY) -m tools.test tests/browser $(PYTEST_ARGS)

.PHONY: bench-media
bench-media: machine $(STAMP) ## forwarding SFU (1:1 calls, a group of 6) vs transcoding: make bench-media [CALLS=5] [DURATION=20] [MEDIA_BENCH_ARGS="--group-size 6 --transcode-calls 2 --profile"]
	$(PY) -m tools.loadtest.bench_media --calls $(or $(CALLS),5) --duration $(or $(DURATION),20) $(MEDIA_BENCH_ARGS)

.PHONY: bench-janus
bench-janus: $(STAMP) ## services/media beside Janus's videoroom (Debian's janus, installed if missing), alternating: make bench-janus [CALLS=20] [DURATION=30] [ROUNDS=2]
	@PYTHON=$(PYTHON) bash tools/machine.sh --janus
	$(PY) -m tools.loadtest.bench_media --janus --skip-transcode --rounds $(or $(ROUNDS),2) --calls $(or $(CALLS),20) --duration $(or $(DURATION),30) $(MEDIA_BENCH_ARGS)

.PHONY: bench-redis
bench-redis: machine $(STAMP) ## client CPU per Redis command: redis-py's pool vs dmcall's LeanBlockingPool, alternating
	$(PY) -m tools.loadtest.bench_redis $(BENCH_ARGS)
