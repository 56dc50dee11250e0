# gtsrb-train: the training image. It runs docker/train-job.sh (teacher, student, archive) on the GTSRB root
# in $DATA_ROOT and copies the results to $OUTPUT; `make train-cloud` runs it as a Vertex AI custom job.
#
#   DOCKER_BUILDKIT=1 docker build -f docker/train.Dockerfile -t gtsrb-train .          # CPU torch
#   ... --build-arg TORCH_INDEX_URL=https://pypi.org/simple                            # CUDA torch (GPU jobs)
#   docker run --rm -v "$DATA":/data:ro -v "$PWD/out":/out -e DATA_ROOT=/data -e OUTPUT=/out gtsrb-train
#
# The build context is the repository root, filtered by docker/train.Dockerfile.dockerignore (BuildKit reads
# the file next to the Dockerfile; the root .dockerignore belongs to the serving image).

# The serving image's base: Debian 12 slim, pinned by its dated tag (docker/base-image.sh builds it locally).
ARG BASE_IMAGE=debian:bookworm-20250520-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.11.* python3-venv=3.11.* \
    && rm -rf /var/lib/apt/lists/*
# torch and torchvision at the pins of requirements/torch.txt, from TORCH_INDEX_URL (CPU-only by default); then
# the training requirements from PyPI. PIP_NO_INDEX=1: install from docker/wheelhouse only (no network).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_NO_INDEX=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements/torch.txt requirements/serve.txt requirements/train.txt /tmp/requirements/
COPY docker/wheelhouse/ /tmp/wheelhouse/
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --find-links /tmp/wheelhouse --index-url "$TORCH_INDEX_URL" \
       -r /tmp/requirements/torch.txt \
    && /opt/venv/bin/pip install --find-links /tmp/wheelhouse -r /tmp/requirements/train.txt \
    && /opt/venv/bin/pip check \
    && rm -rf /tmp/requirements /tmp/wheelhouse

ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/gtsrb
COPY training/ training/
COPY handler/ handler/
COPY tools/ tools/
COPY docker/train-job.sh docker/
# Runs as root: Vertex AI mounts Cloud Storage at /gcs for the job's default user.
ENTRYPOINT ["bash", "docker/train-job.sh"]
