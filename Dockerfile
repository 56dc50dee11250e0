# gtsrb-serve: TorchServe serving model_store/gtsrb.mar behind HAProxy on port 8080, CPU only.
#
#   make archive docker-build docker-run     # then: curl -T sign.png http://127.0.0.1:8080/predictions/gtsrb
#   make docker-test                         # build, run, real requests, health status, drain on stop
#
# The build context must hold model_store/gtsrb.mar (`make archive`) and docker/wheelhouse/ (`make docker-build`
# fills it with the wheels of requirements/image-lock.txt, downloaded on the host, so the build needs no
# PyPI access and no proxy certificate inside). See docker/README.md.

# Debian 12 (bookworm) slim, pinned by its dated tag. With a registry, pin its digest too
# (BASE_IMAGE=debian:bookworm-20250520-slim@sha256:..., docker/README.md). Without one, docker/base-image.sh
# builds the same tag locally from Debian's mirror (debootstrap + docker import): there is no digest to pin.
ARG BASE_IMAGE=debian:bookworm-20250520-slim

# ---- build: a virtual environment with CPU-only torch, TorchServe and the handler's dependencies ----
FROM ${BASE_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.11.* python3-venv=3.11.* \
    && rm -rf /var/lib/apt/lists/*
# Every package, torch and its own dependencies included, is pinned with its sha256 in requirements/image-lock.txt
# (`make docker-lock`); --require-hashes refuses anything else. torch is the CPU-only build (~0.2 GB instead of
# the ~5 GB CUDA one) from TORCH_INDEX_URL. PIP_NO_INDEX=1: install from docker/wheelhouse only (no network).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_NO_INDEX=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements/image-lock.txt /tmp/
COPY docker/wheelhouse/ /tmp/wheelhouse/
# No torchvision: serving does not import it (the handler resizes with Pillow). torch's C++ headers and
# test files (~150 MB) are not needed to run a model.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --find-links /tmp/wheelhouse --extra-index-url "$TORCH_INDEX_URL" \
       -r /tmp/image-lock.txt \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import torch; assert not torch.version.cuda, 'not a CPU-only torch'" \
    && rm -rf /opt/venv/lib/python3.11/site-packages/torch/test /opt/venv/lib/python3.11/site-packages/torch/include

# ---- runtime ----
FROM ${BASE_IMAGE}
# Java for TorchServe's frontend; HAProxy in front of it (docker/haproxy.cfg: the drain on stop, /ready); tini as
# PID 1 forwards signals to docker/serve.py and reaps orphans.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.11.* openjdk-17-jre-headless=17.0.* tini=0.19.* \
       haproxy=2.6.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 model-server \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/model-server model-server \
    && install -d -o 10001 -g 0 -m 0775 /home/model-server/logs /home/model-server/tmp
COPY --from=build /opt/venv /opt/venv
COPY config.properties metrics.yaml log4j2.xml /opt/gtsrb/
COPY tools/torchserve_ctl.py tools/drift_check.py /opt/gtsrb/tools/
# The drift report the VM runs every hour (deploy/cloud-init.yaml, gtsrb-drift.timer), and the model's reference.
COPY models/gtsrb_reference.json /opt/gtsrb/models/
COPY docker/serve.py docker/haproxy.cfg /opt/gtsrb/docker/
COPY docker/errors/ /opt/gtsrb/docker/errors/
COPY model_store/gtsrb.mar /opt/gtsrb/model_store/
# TorchServe's workflow store: empty and read-only (its default would be the model store; SECURITY.md, "Management").
RUN install -d -m 0555 /opt/gtsrb/workflow_store

# HAProxy publishes 8080; TorchServe's inference listens on 127.0.0.1:8079 behind it, management and metrics on
# the container's loopback. The VM and `make docker-run` set TS_METRICS_ADDRESS=http://0.0.0.0:8082 and publish
# it on the host's loopback only, for a scraper there. Every TorchServe setting can be overridden as TS_<PROPERTY>.
# logs/ and tmp/ are group-0 writable: `make docker-run` runs as your uid (group 0) so that the mounted log
# folder stays yours. The VM and `make docker-run` run it with a read-only root file system: logs/ is a mounted
# folder, tmp/ (TorchServe's unpacked archive, the workers' sockets) and /tmp are tmpfs (docker/run.sh).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    GTSRB_HOME=/opt/gtsrb \
    TS_METRICS_CONFIG=/opt/gtsrb/metrics.yaml \
    LOG_LOCATION=/home/model-server/logs \
    METRICS_LOCATION=/home/model-server/logs \
    TEMP=/home/model-server/tmp
USER 10001:10001
WORKDIR /home/model-server
EXPOSE 8080
# Healthy only when the model's workers are READY (TorchServe's /ping says Healthy even when it failed to load).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "/opt/gtsrb/tools/torchserve_ctl.py", "status", "--quiet"]
# docker/serve.py runs HAProxy and TorchServe and exits when either dies; `docker stop` drains first (allow it
# up to 45 s: docker run --stop-timeout 45, as make docker-run and the VM do).
ENTRYPOINT ["tini", "--"]
CMD ["python3", "/opt/gtsrb/docker/serve.py"]
