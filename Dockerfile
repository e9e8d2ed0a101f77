# The relaunch operator image. The same image runs the planning and conversion Jobs of each
# recovery (`relaunch plan`, `relaunch convert`); the chart sets the command explicitly.
#
#   docker build -t relaunch:0.1.0 .
#
# Stage 1 installs the runtime dependencies exactly as requirements.lock pins them (binary wheels
# whose sha256 must match the lock: `make lock` refreshes it), then the project's own wheel without
# resolving anything more, into a virtual environment; stage 2 copies only that environment onto
# the same slim base, so the final image holds no compiler, no build front-end and no source tree.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The same steps tests/test_dockerfile.py runs. The locked dependencies first, in a layer of their
# own that a change to the code alone reuses: a fresh venv, every package by hash.
COPY requirements.lock ./
RUN python -m venv /opt/relaunch \
 && /opt/relaunch/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock
# Then the project's wheel, adding nothing to what the lock installed, and the installer leaves
# the venv (the final image never installs anything).
COPY pyproject.toml README.md ./
COPY operator/ operator/
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
 && /opt/relaunch/bin/pip install --no-deps /dist/relaunch-*.whl \
 && /opt/relaunch/bin/pip check \
 && /opt/relaunch/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="relaunch" \
      org.opencontainers.image.description="Kubernetes operator that resumes distributed training from the newest intact checkpoint" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/relaunch/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /opt/relaunch /opt/relaunch
# A numeric, non-root user: Kubernetes' runAsNonRoot can verify it without an /etc/passwd entry.
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["relaunch", "operator"]
