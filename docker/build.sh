#!/usr/bin/env bash
# Build the serving image (make docker-build). Works with and without a registry or PyPI inside the build:
#   1. base image: present, else pulled, else built locally from Debian's mirror (docker/base-image.sh);
#   2. docker/wheelhouse: every wheel of requirements/image-lock.txt (hash-checked) for the image's Python (3.11,
#      manylinux x86_64), downloaded by the host's pip, which already knows the host's index, proxy and CA
#      certificates, so nothing of that is passed into, or left in, the image. torch comes from the host's
#      find-links (a local CPU wheel), else from TORCH_INDEX_URL;
#   3. the build then installs from the wheelhouse alone (PIP_NO_INDEX=1), again with --require-hashes.
set -euo pipefail
cd "$(dirname "$0")/.."
image=${IMAGE:-gtsrb-serve:latest}
docker=${DOCKER:-docker}
python=${PYTHON:-python3}
torch_index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
base=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)

[ -f model_store/gtsrb.mar ] || { echo "model_store/gtsrb.mar is missing: run make archive" >&2; exit 1; }
if ! $docker image inspect "$base" >/dev/null 2>&1; then
  timeout 120 $docker pull "$base" || bash docker/base-image.sh "$base"
fi

download() {
  $python -m pip download -q --disable-pip-version-check --require-hashes --no-deps --only-binary=:all: \
    --implementation cp --python-version 3.11 --platform manylinux_2_28_x86_64 -d docker/wheelhouse \
    -r requirements/image-lock.txt "$@"
}
# First without the torch index (a local CPU wheel in the host's find-links is enough, and an unreachable index
# costs minutes of retries), then with it.
download 2>/dev/null || download --extra-index-url "$torch_index"

$docker build --build-arg "BASE_IMAGE=$base" --build-arg PIP_NO_INDEX=1 -t "$image" .
echo "built $image: $($docker image inspect -f '{{.Size}}' "$image" | numfmt --to=iec)"
