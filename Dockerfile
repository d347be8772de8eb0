# syntax=docker/dockerfile:1
#
# Tsunagu service images: one build target per service.
#
#   docker build --target ws-gateway -t tsunagu/ws-gateway .
#
# Targets (each runs `tsunagu serve <name> --port <port> --host 0.0.0.0`):
#   ws-gateway 8080, auth 8081, presence 8082, collab 8083, stream-ingest 8084,
#   mqtt-bridge 8085, sim-engine 8086, audit-log 8087
#
# The `tsunagu` command (the root package) holds the table of every service and imports them
# all, so every target carries the same virtual environment: the targets share all layers but
# their last few metadata ones, and building all eight costs about as much as building one.
#
# The images run as uid 10001 and write nothing outside /tmp, so they run with a read-only root
# filesystem (mount an emptyDir or tmpfs on /tmp).

ARG PYTHON_IMAGE=python:3.11-slim
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------
# base: Python with uv, set up to build the project's virtual environment in /app/.venv.
FROM ${PYTHON_IMAGE} AS base
COPY --from=uv /uv /uvx /bin/
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /app

# ---------------------------------------------------------------------------------------------
# deps: third-party dependencies only, exactly as locked. This layer changes only when a
# pyproject.toml or uv.lock does, not when the code does.
FROM base AS deps
COPY pyproject.toml uv.lock ./
COPY libs/core/pyproject.toml libs/core/
COPY services/ws-gateway/pyproject.toml services/ws-gateway/
COPY services/auth/pyproject.toml services/auth/
COPY services/presence/pyproject.toml services/presence/
COPY services/collab/pyproject.toml services/collab/
COPY services/stream-ingest/pyproject.toml services/stream-ingest/
COPY services/mqtt-bridge/pyproject.toml services/mqtt-bridge/
COPY services/sim-engine/pyproject.toml services/sim-engine/
COPY services/audit-log/pyproject.toml services/audit-log/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace --package tsunagu

# ---------------------------------------------------------------------------------------------
# build: the workspace packages (tsunagu, tsunagu-core and the services), installed into the
# environment as wheels, so the runtime image needs no source tree.
FROM deps AS build
COPY README.md ./
COPY src/ src/
COPY libs/ libs/
COPY services/ services/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --package tsunagu

# ---------------------------------------------------------------------------------------------
# runtime: Python and the environment; no uv, no sources, no compilers. Shared by the targets.
FROM ${PYTHON_IMAGE} AS runtime
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=""
LABEL org.opencontainers.image.vendor="Tsunagu" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
RUN groupadd --system --gid 10001 tsunagu \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin tsunagu
# Owned by root: the service cannot change its own code.
COPY --from=build /app/.venv /app/.venv
ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    TSUNAGU_LOG_FORMAT=json
WORKDIR /app
USER 10001:10001

# ---------------------------------------------------------------------------------------------
# One target per service. Kubernetes uses the chart's probes (/healthz, /readyz); HEALTHCHECK
# serves plain Docker and Compose.

FROM runtime AS auth
LABEL org.opencontainers.image.title="tsunagu-auth" \
      org.opencontainers.image.description="Tsunagu auth service: tokens, JWKS and revocations"
EXPOSE 8081
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8081/healthz', timeout=4)"]
ENTRYPOINT ["tsunagu", "serve", "auth"]
CMD ["--port", "8081", "--host", "0.0.0.0"]

FROM runtime AS presence
LABEL org.opencontainers.image.title="tsunagu-presence" \
      org.opencontainers.image.description="Tsunagu presence service"
EXPOSE 8082
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8082/healthz', timeout=4)"]
ENTRYPOINT ["tsunagu", "serve", "presence"]
CMD ["--port", "8082", "--host", "0.0.0.0"]

FROM runtime AS collab
LABEL org.opencontainers.image.title="tsunagu-collab" \
      org.opencontainers.image.description="Tsunagu collaborative editing service"
EXPOSE 8083
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8083/healthz', timeout=4)"]
ENTRYPOINT ["tsunagu", "serve", "collab"]
CMD ["--port", "8083", "--host", "0.0.0.0"]

FROM runtime AS stream-ingest
LABEL org.opencontainers.image.title="tsunagu-stream-ingest" \
      org.opencontainers.image.description="Tsunagu stream ingest service"
EXPOSE 8084
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8084/healthz', timeout=4)"]
ENTRYPOINT ["tsunagu", "serve", "stream-ingest"]
CMD ["--port", "8084", "--host", "0.0.0.0"]

FROM runtime AS mqtt-bridge
LABEL org.opencontainers.image.title="tsunagu-mqtt-bridge" \
      org.opencontainers.image.description="Tsunagu MQTT bridge"
EXPOSE 8085
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8085/healthz', timeout=4)"]
ENTRYPOINT ["tsunagu", "serve", "mqtt-bridge"]
CMD ["--port", "8085", "--host", "0.0.0.0"]

FROM runtime AS sim-engine
LABEL org.opencontainers.image.title="tsunagu-sim-engine" \
      org.opencontainers.image.description="Tsunagu simulation engine"
EXPOSE 8086
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8086/healthz', timeout=4)"]
ENTRYPOINT ["tsunagu", "serve", "sim-engine"]
CMD ["--port", "8086", "--host", "0.0.0.0"]

FROM runtime AS audit-log
LABEL org.opencontainers.image.title="tsunagu-audit-log" \
      org.opencontainers.image.description="Tsunagu audit log"
EXPOSE 8087
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8087/healthz', timeout=4)"]
ENTRYPOINT ["tsunagu", "serve", "audit-log"]
CMD ["--port", "8087", "--host", "0.0.0.0"]

# Last, so that a build without --target gives the gateway.
FROM runtime AS ws-gateway
LABEL org.opencontainers.image.title="tsunagu-ws-gateway" \
      org.opencontainers.image.description="Tsunagu WebSocket gateway: terminates every client connection"
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["tsunagu", "serve", "ws-gateway"]
CMD ["--port", "8080", "--host", "0.0.0.0"]
