# syntax=docker/dockerfile:1
# The gateway's container image. Two stages: `build` installs the hash-pinned dependencies and then the project
# into a virtualenv; the final stage copies only that virtualenv onto the same slim base, plus tini, and runs as an
# unprivileged user. Build with:  docker build -t gateway:local .

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from the lock files alone: this layer is rebuilt only when they change, not on every code
# change. Every wheel is checked against its pinned hash. The lock holds the OTLP trace exporter and the Swagger UI /
# ReDoc assets (core dependencies), so the image exports traces and serves /docs with no download at run time. (The
# embedded PostgreSQL server of `gateway demo` is an extra, `demo`, that the runtime lock leaves out: a container
# runs `gateway serve`.)
COPY requirements/runtime.txt requirements/build.txt requirements/
RUN pip install --no-deps --require-hashes -r requirements/runtime.txt \
 && pip install --no-deps --require-hashes -r requirements/build.txt

# Then the project itself, without dependencies (all pinned above) and without build isolation (its build backend
# comes from the hash-pinned requirements/build.txt, not from an unpinned download). The build tools and pip leave
# again. Bytecode for everything is compiled once here, since the root filesystem is read-only at run time;
# unchecked-hash .pyc files stay valid whatever the file times after COPY --from, and cost no stat() at import.
COPY pyproject.toml README.md ./
COPY app ./app
RUN pip install --no-deps --no-build-isolation --no-compile . \
 && pip uninstall --yes setuptools wheel packaging pip \
 && python -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/venv/lib


FROM ${PYTHON_IMAGE} AS runtime

# tini as PID 1 forwards SIGTERM to the gateway alone (the gateway stops its worker processes itself, after
# draining) and reaps any orphaned child. -s keeps reaping when something else is PID 1 (`docker run --init`,
# compose `init: true`).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_SERVER__HOST=0.0.0.0 \
    GATEWAY_SERVER__PORT=8080

# Numeric, so that Kubernetes can verify runAsNonRoot without looking the name up.
USER 10001:10001
EXPOSE 8080

# Liveness only (the process and its event loop answer). Readiness is /readyz, which an orchestrator asks itself.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GATEWAY_SERVER__PORT', '8080') + '/healthz', timeout=2)"]

# SIGTERM starts the drain (readiness off, keep serving for drain_delay_s, finish in-flight requests within
# drain_timeout_s, stop the worker processes, exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/bin/tini", "-s", "--", "gateway", "serve"]
# Arguments for `gateway serve`: compose and Kubernetes pass `--config /etc/gateway/gateway.toml`.
CMD []
