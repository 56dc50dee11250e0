#!/usr/bin/env bash
# Build the serving image (make docker-build). Works with and without a registry or PyPI inside the build:
#   1. base image: present, else pulled, else built locally from Debian's mirror (docker/base-image.sh);
#   2. docker/wheelhouse: the pinned wheels of requirements/serve.txt for the image's Python (3.11, manylinux
#      x86_64), downloaded by the host's pip, which already knows the host's index, proxy and CA certificates,
#      so nothing of that is passed into, or left in, the image;
#   3. torch: a local CPU-only wheel when there is one (TORCH_WHEEL, else a torch-*+cpu wheel in $PIP_FIND_LINKS),
#      then the build runs with no index at all; otherwise the image takes the pinned version from TORCH_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${IMAGE:-gtsrb-serve:latest}
docker=${DOCKER:-docker}
python=${PYTHON:-python3}
base=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)

[ -f model_store/gtsrb.mar ] || { echo "model_store/gtsrb.mar is missing: run make archive" >&2; exit 1; }
if ! $docker image inspect "$base" >/dev/null 2>&1; then
  timeout 120 $docker pull "$base" || bash docker/base-image.sh "$base"
fi

download() {
  $python -m pip download -q --disable-pip-version-check --only-binary=:all: --implementation cp \
    --python-version 3.11 --platform manylinux_2_28_x86_64 -d docker/wheelhouse "$@"
}
download -r requirements/serve.txt

args=(--build-arg "BASE_IMAGE=$base")
[ -n "${TORCH_INDEX_URL:-}" ] && args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
wheel=${TORCH_WHEEL:-}
if [ -z "$wheel" ] && [ -n "${PIP_FIND_LINKS:-}" ]; then
  wheel=$(ls "$PIP_FIND_LINKS"/torch-*+cpu-cp311-*manylinux*x86_64.whl 2>/dev/null | sort -V | tail -1 || true)
fi
rm -f docker/wheelhouse/torch-*.whl
if [ -n "$wheel" ]; then
  download "$wheel"  # the wheel and what it depends on (filelock, sympy, ...)
  version=$(basename "$wheel" | cut -d- -f2)  # torch-2.13.0+cpu-cp311-... -> 2.13.0+cpu
  echo "torch from local wheel $(basename "$wheel")"
  args+=(--build-arg "TORCH_VERSION=$version" --build-arg PIP_NO_INDEX=1)
fi

$docker build "${args[@]}" -t "$image" .
echo "built $image: $($docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec)"
