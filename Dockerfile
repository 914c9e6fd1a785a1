# syntax=docker/dockerfile:1
# authsvc: one image for both processes. `docker run IMAGE grpc` or `docker run IMAGE webhook`.
#
# - build: a wheel of authsvc (with the client package's stubs) and a wheel of every dependency,
#   resolved under constraints.txt (the pins the image is tested with);
# - runtime: python slim with those wheels installed, nothing else: no compiler, no pip cache, no
#   `embedded` extra (SecantusDB is the development database; production runs against MongoDB).
# It runs as UID/GID 10001 and writes only to TMPDIR (/tmp): mount a writable volume there when the
# root filesystem is read-only (the Kubernetes manifests mount an emptyDir). The worker supervisor
# makes its fresh PROMETHEUS_MULTIPROC_DIR under TMPDIR on each start.
#
# IMAGE_EXTRAS lists the extras installed: `envoy` serves Envoy's ext_authz Check with
# AUTHSVC_EXT_AUTHZ=on; `otel` traces with OpenTelemetry when OTEL_EXPORTER_OTLP_ENDPOINT is set.
# With both, opentelemetry-proto is reinstalled last: xds-protos ships an older copy of its files.

FROM python:3.11-slim-bookworm AS build
ARG IMAGE_EXTRAS=envoy,otel
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY authsvc ./authsvc
COPY service ./service
COPY webhook ./webhook
COPY clients/python/authsvc_client ./clients/python/authsvc_client
RUN pip wheel --wheel-dir /wheels --constraint constraints.txt ".[${IMAGE_EXTRAS}]"

FROM python:3.11-slim-bookworm
ARG IMAGE_EXTRAS=envoy,otel
LABEL org.opencontainers.image.title="authsvc" \
      org.opencontainers.image.description="Clerk-backed identity for internal services: gRPC API and webhook sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    TMPDIR=/tmp \
    AUTHSVC_ENV=production \
    AUTHSVC_GRPC_ADDR=0.0.0.0:50051 \
    AUTHSVC_METRICS_ADDR=0.0.0.0:9464 \
    AUTHSVC_WEBHOOK_ADDR=0.0.0.0:8080
RUN groupadd --system --gid 10001 authsvc \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin authsvc
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints.txt,target=/constraints.txt \
    pip install --no-index --find-links /wheels --constraint /constraints.txt "authsvc[${IMAGE_EXTRAS}]" \
 && if pip show --quiet opentelemetry-proto 2>/dev/null; then \
        pip install --no-index --find-links /wheels --constraint /constraints.txt --force-reinstall --no-deps opentelemetry-proto; \
    fi
WORKDIR /app
USER 10001:10001
EXPOSE 50051 8080 9464
# Kubernetes probes it (gRPC health, /readyz, /healthz); compose.yaml says how for each command.
# checkov:skip=CKV_DOCKER_2:one image serves two commands with different health endpoints: the Kubernetes probes and compose.yaml's healthchecks check each
ENTRYPOINT ["authsvc"]
CMD ["grpc"]
