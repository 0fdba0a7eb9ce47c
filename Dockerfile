# bagserve image. Two variants from one file, chosen by the base image:
#   docker build -t bagserve:cpu .
#   docker build -t bagserve:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 .
# (the CUDA variant runs onnxruntime-gpu on CUDA 13 + cuDNN 9 from the base image).
# Run: docker run -p 8000:8000 bagserve:cpu             (serves the built-in demo model)
# Models: mount a folder read-only at /models holding models.toml and the checkpoints:
#   docker run -p 8000:8000 -v "$PWD/models:/models:ro" \
#     -e BAGSERVE_CONFIG=/models/models.toml bagserve:cpu
# Every setting is a BAGSERVE_* variable (see service/settings.py). Stop with a grace of
# at least BAGSERVE_SHUTDOWN_GRACE_S + 5 s (docker stop -t 30; Kubernetes
# terminationGracePeriodSeconds: 30) so every admitted request finishes.

ARG BUILD_IMAGE=python:3.11.10-slim-bookworm
ARG BASE_IMAGE=python:3.11.10-slim-bookworm

# --- build: one pure-Python wheel of the project -------------------------------------
FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kernels ./kernels
COPY models ./models
COPY service ./service
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime ----------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
# CUDA bases have no Python: take the distribution's (versions follow the pinned base).
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --system --uid 10001 --home-dir /home/bagserve --create-home bagserve
COPY --from=build /wheels /wheels
RUN python3 -m venv /opt/bagserve \
    && /opt/bagserve/bin/pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels
ENV PATH=/opt/bagserve/bin:$PATH \
    BAGSERVE_HOST=0.0.0.0 \
    BAGSERVE_PORT=8000 \
    BAGSERVE_SHUTDOWN_GRACE_S=25 \
    NUMBA_CACHE_DIR=/tmp/numba-cache
USER 10001
WORKDIR /home/bagserve
VOLUME ["/models"]
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 CMD ["bagserve", "ready"]
CMD ["bagserve", "serve"]
