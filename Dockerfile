# syntax=docker/dockerfile:1
# bulk-tagger: the worker image for the nightly CronJob and the sharded Indexed Job.
#
#   docker build -t bulk-tagger:0.1.0 --build-arg VERSION=0.1.0 \
#       --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Two stages: the builder fetches every dependency's wheel exactly as requirements.lock pins it
# (each file checked against the lock's hashes) and builds the project's wheel with the build
# tools of requirements-build.lock; the final stage installs only those wheels, offline, from a
# bind mount, checking the lock's hashes again, so no wheel file, build tool or pip cache ends
# up in a layer. Two builds from the same commit install the same files. Both stages use the
# same base image, so the binary wheels match the final interpreter and libc. The locks fit
# every Python from 3.11 (`make lock` refreshes them).

FROM python:3.12.12-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# Wheels only (--only-binary): a dependency built from source here would use build tools the
# lock does not pin.
COPY requirements-build.lock requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements-build.lock \
    && pip wheel --no-cache-dir --require-hashes --only-binary=:all: --wheel-dir /wheels \
       -r requirements.lock \
    && cp requirements.lock /wheels/
# README.md is optional (pyproject names it as the long description); the glob keeps COPY
# from failing where it is absent.
COPY pyproject.toml README.m[d] ./
COPY worker/ worker/
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .


FROM python:3.12.12-slim-bookworm

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/example/bulk-tagger

LABEL org.opencontainers.image.title="bulk-tagger" \
      org.opencontainers.image.description="Change the tags and settings of very many Gcore Cloud VM images, safely and as fast as the API allows." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.12.12-slim-bookworm"

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only at run time; pip compiled the
# .pyc files at install time already.  HOME=/tmp: the only other writable place.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    HOME=/tmp \
    BULK_TAGGER_STATE_DIR=/var/lib/bulk-tagger

# --no-index: only the wheels the builder made, nothing fetched here; the dependencies as
# locked (hashes checked), then the project's own wheel. The smoke test makes the build fail if
# the console script cannot start.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels --require-hashes \
        -r /wheels/requirements.lock \
    && pip install --no-cache-dir --no-index --no-deps /wheels/bulk_tagger-*.whl \
    && bulk-tagger --help > /dev/null

# A fixed, numeric UID/GID so Kubernetes can verify runAsNonRoot and fsGroup can match it.
RUN groupadd --system --gid 10001 bulk-tagger \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
       --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin bulk-tagger \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/bulk-tagger

# Runs, journals and reports live here: mount a persistent volume on it.
VOLUME ["/var/lib/bulk-tagger"]
WORKDIR /var/lib/bulk-tagger
USER 10001:10001

# The worker traps SIGTERM, finishes or journals what is in flight within --grace-seconds
# (default 20 s) and exits 75 so a retry with --resume carries on.
STOPSIGNAL SIGTERM
ENTRYPOINT ["bulk-tagger"]
CMD ["--help"]
