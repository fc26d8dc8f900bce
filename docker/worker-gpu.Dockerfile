# syntax=docker/dockerfile:1
#
# GPU Celery worker: takes the `gpu` queue (install, sft, rm, ppo, evaluate).
# CUDA *devel* base because DeepSpeed compiles its ops with nvcc: the common ones are
# prebuilt below, any other is JIT-built on first use (ninja + nvcc are here for that).
#
#   docker build -f docker/worker-gpu.Dockerfile -t rlhf-airflow-worker-gpu:0.1.0 .
#
# Host needs: NVIDIA driver new enough for the CUDA version below (CUDA 13.0: driver
# >= 580) and the NVIDIA Container Toolkit. Older driver: build with a CUDA 12.x base and
# the matching torch index, e.g.
#   --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-devel-ubuntu24.04 --build-arg TORCH_CUDA=cu128

ARG CUDA_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
ARG AIRFLOW_UID=50000
# Ampere (A100, 8.0) and Hopper (H100/H200, 9.0). Plain "9.0", not "9.0a": DeepSpeed's op
# builder cannot parse the arch-suffixed form (rlhf_tasks.runtime.engine normalises it anyway).
# Add 8.6/8.9 for RTX/L4/L40 cards, 10.0 for Blackwell.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"

LABEL org.opencontainers.image.title="rlhf-airflow-worker-gpu" \
      org.opencontainers.image.description="Airflow Celery worker (queue gpu) with CUDA, torch and DeepSpeed"

ENV DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/rlhf/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    RLHF_STORAGE=/shared/storage \
    HF_HOME=/shared/hf-cache \
    TOKENIZERS_PARALLELISM=false

# python3.12 (Ubuntu 24.04's) with headers for DeepSpeed's extensions; libaio for ZeRO's
# NVMe offload; openssh-client + pdsh for DeepSpeed's multi-node launcher; tini as PID 1.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev build-essential ninja-build git curl ca-certificates \
      libaio-dev libpq5 openssh-client pdsh tini \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv && pip install --upgrade pip wheel "setuptools>=68" ninja

# torch built for this image's CUDA, from PyTorch's own index.
RUN pip install "torch==${TORCH_VERSION}" --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}"

COPY requirements.txt requirements-lock.txt requirements-nodeps.txt /src/
# Prebuild the DeepSpeed ops the recipes use (CPU Adam for offload, fused Adam, the ZeRO
# flatten utils); --no-build-isolation so that they compile against the torch above.
RUN DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 DS_BUILD_UTILS=1 \
    pip install --no-build-isolation -c /src/requirements-lock.txt -r /src/requirements.txt \
 && pip install --no-deps -r /src/requirements-nodeps.txt \
 && python -c "import torch, deepspeed; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'deepspeed', deepspeed.__version__)"

COPY pyproject.toml README.md /src/
COPY rlhf_tasks /src/rlhf_tasks
RUN pip install --no-deps --no-build-isolation /src

RUN useradd --uid "${AIRFLOW_UID}" --gid 0 --home-dir "${AIRFLOW_HOME}" --create-home --shell /bin/bash airflow \
 && mkdir -p /opt/rlhf/dags "${AIRFLOW_HOME}/logs" /shared/storage /shared/hf-cache /shared/locks \
 && chown -R airflow:0 "${AIRFLOW_HOME}" /shared \
 && chmod -R g+rwX "${AIRFLOW_HOME}" /shared

COPY --chown=airflow:0 dags /opt/rlhf/dags
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/rlhf-entrypoint

USER airflow
WORKDIR /opt/airflow
EXPOSE 8793

# Healthy = this worker's Celery node answers a ping through the broker.
HEALTHCHECK --interval=60s --timeout=30s --start-period=120s --retries=5 \
    CMD celery --app airflow.providers.celery.executors.celery_executor.app inspect ping \
        -d "gpu-worker@${HOSTNAME}" || exit 1

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/rlhf-entrypoint"]
CMD ["airflow", "celery", "worker", "--queues", "gpu", "--concurrency", "1", "--celery-hostname", "gpu-worker@%h"]
