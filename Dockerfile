# gtsrb-serve: TorchServe serving model_store/gtsrb.mar on port 8080, CPU only.
#
#   make archive docker-build docker-run     # then: curl -T sign.png http://127.0.0.1:8080/predictions/gtsrb
#   make docker-test                         # build, run, real requests, health status, stop
#
# The build context must hold model_store/gtsrb.mar (`make archive`) and docker/wheelhouse/ (`make docker-build`
# fills it with the pinned wheels of requirements/serve.txt, downloaded on the host, so the build needs no
# PyPI access and no proxy certificate inside). See docker/README.md.

# Debian 12 (bookworm) slim, pinned by its dated tag. Without a registry, docker/base-image.sh builds the same
# tag locally from Debian's mirror (debootstrap + docker import).
ARG BASE_IMAGE=debian:bookworm-20250520-slim

# ---- build: a virtual environment with CPU-only torch, TorchServe and the handler's dependencies ----
FROM ${BASE_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.11.* python3-venv=3.11.* \
    && rm -rf /var/lib/apt/lists/*
# CPU-only torch: ~0.2 GB instead of the ~5 GB CUDA build. TORCH_VERSION defaults to the pin of
# requirements/torch.txt; another version must load the exported model (make docker-test checks the answers).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=
# PIP_NO_INDEX=1: install from docker/wheelhouse only (no network).
ARG PIP_NO_INDEX=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY requirements/torch.txt requirements/serve.txt /tmp/
COPY docker/wheelhouse/ /tmp/wheelhouse/
# No torchvision: serving does not import it (training/presets.py resizes with Pillow). torch's C++ headers and
# test files (~150 MB) are not needed to run a model.
RUN python3 -m venv /opt/venv \
    && torch_req="${TORCH_VERSION:+torch==$TORCH_VERSION}" \
    && torch_req="${torch_req:-$(grep -E '^torch==' /tmp/torch.txt)}" \
    && /opt/venv/bin/pip install --find-links /tmp/wheelhouse --index-url "$TORCH_INDEX_URL" "$torch_req" \
    && /opt/venv/bin/pip install --find-links /tmp/wheelhouse -r /tmp/serve.txt \
    && /opt/venv/bin/python -c "import torch; assert not torch.version.cuda, 'not a CPU-only torch'" \
    && rm -rf /opt/venv/lib/python3.11/site-packages/torch/test /opt/venv/lib/python3.11/site-packages/torch/include

# ---- runtime ----
FROM ${BASE_IMAGE}
# Java for TorchServe's frontend; tini forwards signals to the whole process group and reaps the workers.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.11.* openjdk-17-jre-headless=17.0.* tini=0.19.* \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 model-server \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/model-server model-server
COPY --from=build /opt/venv /opt/venv
COPY config.properties metrics.yaml log4j2.xml /opt/gtsrb/
COPY tools/torchserve_ctl.py /opt/gtsrb/tools/
COPY model_store/gtsrb.mar /opt/gtsrb/model_store/

# Inference listens on all interfaces inside the container (only 8080 is published); management and metrics
# stay on the container's loopback. Every TorchServe setting can be overridden the same way: TS_<PROPERTY>.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    TS_INFERENCE_ADDRESS=http://0.0.0.0:8080 \
    TS_METRICS_CONFIG=/opt/gtsrb/metrics.yaml \
    LOG_LOCATION=/home/model-server/logs \
    METRICS_LOCATION=/home/model-server/logs \
    TEMP=/home/model-server/tmp
USER 10001:10001
WORKDIR /home/model-server
RUN mkdir -p logs tmp
EXPOSE 8080
# Healthy only when the model's workers are READY (TorchServe's /ping says Healthy even when it failed to load).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "/opt/gtsrb/tools/torchserve_ctl.py", "status", "--quiet"]
# TorchServe in the foreground: the container stops when the server does.
ENTRYPOINT ["tini", "-g", "--"]
CMD ["torchserve", "--foreground", "--ncs", "--disable-token-auth", "--ts-config", "/opt/gtsrb/config.properties", \
     "--log-config", "/opt/gtsrb/log4j2.xml", "--model-store", "/opt/gtsrb/model_store", "--models", "gtsrb=gtsrb.mar"]
