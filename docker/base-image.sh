#!/usr/bin/env bash
# Build the pinned base image locally when no image registry is reachable.
#
#   bash docker/base-image.sh debian:bookworm-20250520-slim
#
# The Dockerfile starts FROM a pinned Debian tag. With Docker Hub reachable, `docker build` pulls it and this
# script is not needed. Without a registry (our development machines), this makes an equivalent minimal
# Debian bookworm root file system with debootstrap (Debian's package mirror is reachable) and imports it
# under the same tag, so the Dockerfile stays the one users build. Needs root, debootstrap and a Docker engine.
set -euo pipefail
tag=${1:?usage: base-image.sh IMAGE:TAG}
docker=${DOCKER:-docker}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if $docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image $tag already present"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install -y debootstrap" >&2; exit 1; }

rootfs=$(mktemp -d /tmp/gtsrb-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm (minbase) from $mirror ..."
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
  || { tail -20 "$rootfs.log" >&2; exit 1; }
rm -f "$rootfs.log"
# The official image's package sources: the release, its updates and the security archive.
rm -f "$rootfs"/etc/apt/sources.list
cat >"$rootfs"/etc/apt/sources.list.d/debian.sources <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# What the official slim image also drops: package lists and caches.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
tar -C "$rootfs" -c . | $docker import --change 'CMD ["bash"]' \
  --message "debootstrap --variant=minbase bookworm, $(date -u +%F)" - "$tag"
echo "imported $tag ($($docker image inspect -f '{{.Size}}' "$tag" | numfmt --to=iec))"
