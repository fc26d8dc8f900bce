# syntax=docker/dockerfile:1
#
# Airflow services image: api-server, scheduler, dag-processor, triggerer, the CPU Celery
# worker (default queue: `register`) and the MLflow tracking server.
#
# No CUDA here: torch is the CPU build (the CPU worker only writes reports and registers
# models), DeepSpeed is installed without prebuilt ops. GPU stages run in
# docker/worker-gpu.Dockerfile.
#
#   docker build -f docker/airflow.Dockerfile -t rlhf-airflow:0.1.0 .

# ---- build stage: compilers live here only --------------------------------------------
FROM python:3.11.11-slim-bookworm AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential libpq-dev \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv && pip install --upgrade pip wheel "setuptools>=68"

# torch first, from the CPU index: the `torch==X` line of requirements.txt is then already
# satisfied (X+cpu), so pip pulls no CUDA wheels (~3 GB saved).
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY requirements.txt requirements-lock.txt requirements-nodeps.txt /src/
# DS_BUILD_OPS=0: no DeepSpeed kernels on this image; --no-build-isolation because
# DeepSpeed's setup.py imports the torch installed above.
RUN DS_BUILD_OPS=0 pip install --no-build-isolation -c /src/requirements-lock.txt -r /src/requirements.txt \
 && pip install --no-deps -r /src/requirements-nodeps.txt

COPY pyproject.toml README.md /src/
COPY rlhf_tasks /src/rlhf_tasks
RUN pip install --no-deps --no-build-isolation /src

# ---- runtime stage ---------------------------------------------------------------------
FROM python:3.11.11-slim-bookworm

LABEL org.opencontainers.image.title="rlhf-airflow" \
      org.opencontainers.image.description="Airflow 3 services and CPU worker for the RLHF pipeline"

ARG AIRFLOW_UID=50000

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    AIRFLOW_HOME=/opt/airflow \
    AIRFLOW__CORE__DAGS_FOLDER=/opt/rlhf/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    RLHF_STORAGE=/shared/storage \
    HF_HOME=/shared/hf-cache \
    TOKENIZERS_PARALLELISM=false

# tini: PID 1 that forwards SIGTERM (warm Celery shutdown) and reaps the stage processes.
# curl: healthchecks. libpq5: psycopg2 at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini curl libpq5 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/venv /opt/venv

# The shared volume's mount point exists in the image with the right owner, so that
# Docker initialises a fresh named volume as writable by the airflow user.
RUN useradd --uid "${AIRFLOW_UID}" --gid 0 --home-dir "${AIRFLOW_HOME}" --create-home --shell /bin/bash airflow \
 && mkdir -p /opt/rlhf/dags "${AIRFLOW_HOME}/logs" /shared/storage /shared/hf-cache /shared/mlflow-artifacts \
 && chown -R airflow:0 "${AIRFLOW_HOME}" /shared \
 && chmod -R g+rwX "${AIRFLOW_HOME}" /shared

COPY --chown=airflow:0 dags /opt/rlhf/dags
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/rlhf-entrypoint

USER airflow
WORKDIR /opt/airflow
EXPOSE 8080 5000 8793

# Each service overrides this in docker-compose.yml with a check of its own; this one
# fits every Airflow process: the metadata DB is reachable with this image's config.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=5 \
    CMD airflow db check || exit 1

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/rlhf-entrypoint"]
CMD ["airflow", "version"]
