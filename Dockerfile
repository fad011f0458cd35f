# syntax=docker/dockerfile:1
# onnxpipe serve: an Open Inference Protocol server with dynamic batching.
#
#   GPU (default): docker build -t onnxpipe-serve .
#                  docker run --gpus all -p 8000:8000 -v $PWD/models:/models:ro onnxpipe-serve
#   CPU:           docker build --build-arg VARIANT=cpu -t onnxpipe-serve:cpu .
#
# VARIANT picks the base image and the pyproject extra with the matching ONNX Runtime build
# (gpu: onnxruntime-gpu on a CUDA 12 + cuDNN 9 runtime; cpu: onnxruntime on plain Ubuntu).
# Both stages share one base so the virtual environment's Python is the one that runs it.

ARG VARIANT=gpu
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG CPU_IMAGE=ubuntu:24.04

FROM ${CUDA_IMAGE} AS base-gpu
ENV ONNXPIPE_DEVICES=cuda:0

FROM ${CPU_IMAGE} AS base-cpu
ENV ONNXPIPE_DEVICES=cpu

# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM base AS build
ARG VARIANT
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY onnxpipe ./onnxpipe
COPY models ./models
RUN pip install --no-cache-dir -c constraints.txt ".[${VARIANT},serve]" \
    && python -c "import onnxpipe, onnxruntime, aiohttp"

FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="onnxpipe-serve" \
      org.opencontainers.image.description="onnxpipe serve: KServe v2 / Open Inference Protocol server (${VARIANT})"
COPY --from=build /opt/venv /opt/venv
RUN useradd --system --uid 10001 --create-home --home-dir /home/onnxpipe onnxpipe \
    && mkdir -p /models \
    && chown onnxpipe /models
USER 10001
WORKDIR /home/onnxpipe
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
# inside a container the server must listen beyond loopback; --devices comes from ONNXPIPE_DEVICES
ENTRYPOINT ["onnxpipe", "serve"]
CMD ["/models", "--host", "0.0.0.0", "--port", "8000"]
