# The two commands are `make run` and `make test`; everything else is what they are made of.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

UV ?= python3 -m uv
PROTO_OUT := libs/core/src/tsunagu_core/wire
PROTO_FILES := $(notdir $(wildcard proto/tsunagu/v1/*.proto))
# The Centrifugo client protocol as the gateway serves it (stock SDKs' wire format).
CLIENT_PROTO_OUT := services/ws-gateway/src/tsunagu_ws_gateway/protocol/wire
# Centrifugo's proxy and server API schemas, vendored unchanged (proto/centrifugal/centrifugo/README.md).
CENTRIFUGO_PROTO_OUT := services/ws-gateway/src/tsunagu_ws_gateway/centrifugo
CENTRIFUGO_PROTO_FILES := proxy.proto api.proto
# mypy checks installed packages by name: the CLI, the core, and one per service.
MYPY_PACKAGES := -p tsunagu -p tsunagu_core $(foreach d,$(wildcard services/*/src/tsunagu_*),-p $(notdir $(d)))
PYTEST_ARGS ?=

.PHONY: help install js-install run test lint fmt proto proto-check docs docs-check web web-check js-test loadgen-test unit stack-up stack-down stack-status bench deploy-check

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

# Bytecode is compiled here, once: with PYTHONDONTWRITEBYTECODE set (as in many CI images and sandboxes)
# nothing is ever cached, and every process compiles every module again (a gateway took 3.5 s instead of
# 1.5 s to start, which is how much a client reconnecting to a restarted one must recover).
install: ## uv and every workspace package with its locked dependencies (all `make run` needs)
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check uv
	@$(UV) sync --all-packages --frozen --quiet --compile-bytecode
	@.venv/bin/python -m compileall -q src libs/core/src services/*/src >/dev/null

js-install: ## the JavaScript packages: stock clients of the e2e tests, the offline client, the web app
	@for dir in tests/e2e/js clients/js web; do npm ci --prefix $$dir --no-audit --no-fund --loglevel=error; done

run: install ## the whole platform in one process (embedded engines): http://127.0.0.1:8080/
	$(UV) run tsunagu run

lint: install js-install proto-check docs-check web-check ## ruff, mypy, tsc, generated code, docs and the web build up to date
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run mypy $(MYPY_PACKAGES)

fmt: install ## apply ruff's fixes and formatting
	$(UV) run ruff check --fix .
	$(UV) run ruff format .

proto: install ## regenerate the Python code of proto/ (committed)
	$(UV) run python -m grpc_tools.protoc -Iproto/tsunagu/v1 --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) $(PROTO_FILES)
	$(UV) run python -m grpc_tools.protoc -Iproto/centrifugal --python_out=$(CLIENT_PROTO_OUT) --pyi_out=$(CLIENT_PROTO_OUT) centrifuge_client.proto
	$(UV) run python -m grpc_tools.protoc -Iproto/centrifugal/centrifugo --python_out=$(CENTRIFUGO_PROTO_OUT) --pyi_out=$(CENTRIFUGO_PROTO_OUT) $(CENTRIFUGO_PROTO_FILES)

proto-check: install ## fail when the committed generated code differs from proto/
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	$(UV) run python -m grpc_tools.protoc -Iproto/tsunagu/v1 --python_out=$$tmp --pyi_out=$$tmp $(PROTO_FILES); \
	for f in $$tmp/*; do cmp -s $$f $(PROTO_OUT)/$$(basename $$f) || { echo "$(PROTO_OUT)/$$(basename $$f) is stale: run make proto"; exit 1; }; done; \
	rm -f $$tmp/*; $(UV) run python -m grpc_tools.protoc -Iproto/centrifugal --python_out=$$tmp --pyi_out=$$tmp centrifuge_client.proto; \
	for f in $$tmp/*; do cmp -s $$f $(CLIENT_PROTO_OUT)/$$(basename $$f) || { echo "$(CLIENT_PROTO_OUT)/$$(basename $$f) is stale: run make proto"; exit 1; }; done; \
	rm -f $$tmp/*; $(UV) run python -m grpc_tools.protoc -Iproto/centrifugal/centrifugo --python_out=$$tmp --pyi_out=$$tmp $(CENTRIFUGO_PROTO_FILES); \
	for f in $$tmp/*; do cmp -s $$f $(CENTRIFUGO_PROTO_OUT)/$$(basename $$f) || { echo "$(CENTRIFUGO_PROTO_OUT)/$$(basename $$f) is stale: run make proto"; exit 1; }; done

docs: install ## regenerate docs/configuration.md from the settings classes
	$(UV) run tsunagu config-docs

docs-check: install ## fail when docs/configuration.md differs from the settings classes
	$(UV) run tsunagu config-docs --check

web: js-install ## rebuild the demo web app into the gateway's static files (committed: `make run` needs no Node)
	npm run build --prefix web

# The committed build must be what the sources build to, byte for byte.
web-check: js-install ## typecheck the web app and the offline client; fail when the committed build is stale
	npm run typecheck --prefix web
	npm run typecheck --prefix clients/js
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	npm run build --prefix web -- --outDir $$tmp/web --logLevel warn >/dev/null; \
	diff -r -q $$tmp/web services/ws-gateway/src/tsunagu_ws_gateway/web || { echo "the web app build is stale: run make web"; exit 1; }

js-test: js-install ## the offline client's unit tests (Vitest)
	npm test --prefix clients/js

loadgen-test: ## the Go load generator's vet and unit tests (bench/loadgen: the Socket.IO packet codec)
	cd bench/loadgen && go vet ./... && go test ./...

unit: install ## unit tests only (memory engines; no servers)
	$(UV) run pytest libs services tests/stack tests/run $(PYTEST_ARGS)

stack-up: install ## start the real local infrastructure (Redis, Kafka, PostgreSQL, Mosquitto, Prometheus; `tsunagu stack up turn` adds coturn)
	$(UV) run tsunagu stack up

stack-down: install ## stop the local infrastructure (its data stays under .stack/)
	$(UV) run tsunagu stack down

stack-status: install ## what of the local infrastructure runs (exit 3: nothing does)
	$(UV) run tsunagu stack status

# The stack is brought down whatever the tests did (also when only part of it came up), and the
# first failing exit code is kept.
test: install js-install lint js-test loadgen-test ## everything, on the real stack: lint, unit, JS unit, e2e (with Chromium), deploy checks
	$(UV) run python -m tsunagu.browser
	@status=0; \
	$(UV) run tsunagu stack up || status=$$?; \
	if [ $$status -eq 0 ]; then $(UV) run tsunagu stack up turn || status=$$?; fi; \
	eval "$$($(UV) run tsunagu stack env turn)"; \
	if [ $$status -eq 0 ]; then TSUNAGU_TEST_STACK=1 $(UV) run pytest libs services tests $(PYTEST_ARGS) || status=$$?; fi; \
	if [ $$status -eq 0 ]; then bash deploy/check.sh || status=$$?; fi; \
	$(UV) run tsunagu stack down || true; \
	$(UV) run tsunagu stack down turn || true; \
	exit $$status

deploy-check: ## helm lint/template, schema validation, Dockerfile lint
	bash deploy/check.sh

bench: install js-install ## benchmarks (engines and every stage on the real stack, raw results in bench/results/); see docs/benchmarks.md
	$(UV) run tsunagu stack up redis kafka postgres mosquitto
	eval "$$($(UV) run tsunagu stack env)"; $(UV) run python bench/run.py && $(UV) run python bench/latency.py \
		&& $(UV) run python bench/storm.py
	$(UV) run python bench/broadcast.py
	eval "$$($(UV) run tsunagu stack env)"; $(UV) run python bench/workers.py && $(UV) run python bench/uni_fanout.py
	$(UV) run python bench/redis_cluster.py
	eval "$$($(UV) run tsunagu stack env)"; $(UV) run python bench/auth.py && $(UV) run python bench/audit.py \
		&& $(UV) run python bench/ingest.py && $(UV) run python bench/mqtt.py && $(UV) run python bench/sim.py \
		&& $(UV) run python bench/collab.py && $(UV) run python bench/mllp.py && $(UV) run python bench/fhir_notify.py
	$(UV) run python bench/delta.py
	eval "$$($(UV) run tsunagu stack env)"; $(UV) run python bench/device_rtt.py \
		&& $(UV) run python bench/socketio_fanout.py
	eval "$$($(UV) run tsunagu stack env)"; $(UV) run python bench/sim.py --entities 10000 --clients 1000 --hz 30 \
		--encoding json --publish batch --seconds 15 --far-every 10 --far-ring 3
