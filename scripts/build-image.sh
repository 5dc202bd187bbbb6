#!/usr/bin/env bash
# Build the embedlift image from nothing on a machine with no Docker engine and no registry access:
#   1. a Debian bookworm base image made with debootstrap (skipped when BASE is given or already built),
#   2. the CPU torch wheel this machine's pip uses, staged into the build context's wheels/ folder,
#   3. `buildah build --isolation chroot --format docker` of the Dockerfile (docker format keeps HEALTHCHECK).
# With a Docker engine and a registry, the same Dockerfile builds with plain `docker build -t embedlift .`.
#
# Environment: IMAGE (default localhost/embedlift:latest), BASE (a base image name; default: the debootstrap
# one), WORK (scratch folder, default build/image), SUITE (default bookworm), MIRROR (default
# http://deb.debian.org/debian, the mirror apt is configured with here).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/embedlift:latest}
WORK=${WORK:-build/image}
SUITE=${SUITE:-bookworm}
BASE_IMAGE=localhost/embedlift-base:$SUITE
MIRROR=${MIRROR:-http://deb.debian.org/debian}
export BUILDAH_ISOLATION=chroot

need() { command -v "$1" >/dev/null || { apt-get update -q && apt-get install -y -q "$2"; }; }
need buildah buildah
mkdir -p "$WORK"

# 1. The base image: Debian minbase + Python 3.11 (the CPython torch's wheel is built for) + CA certificates.
if [ -z "${BASE:-}" ]; then
    BASE=$BASE_IMAGE
    if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
        need debootstrap debootstrap
        rootfs="$WORK/rootfs"
        rm -rf "$rootfs" && mkdir -p "$rootfs"
        echo "debootstrap $SUITE from $MIRROR" >&2
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$SUITE" "$rootfs" "$MIRROR"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -cf "$WORK/rootfs.tar" .
        ctr=$(buildah from scratch)
        buildah add "$ctr" "$WORK/rootfs.tar" /
        buildah config --cmd /bin/bash --env LANG=C.UTF-8 "$ctr"
        buildah commit --format docker "$ctr" "$BASE"
        buildah rm "$ctr"
        rm -rf "$rootfs" "$WORK/rootfs.tar"
    fi
fi

# 2. CPU torch from where this machine's pip finds it (PyPI serves only CUDA builds of torch for Linux).
rm -f wheels/torch-*.whl
links=$(pip config get global.find-links 2>/dev/null || true)
for dir in $links ${PIP_FIND_LINKS:-}; do
    for whl in "$dir"/torch-2.13.0+cpu-*.whl; do
        [ -f "$whl" ] && cp "$whl" wheels/ && break 2
    done
done

# 3. The image. The host's CA bundle reaches pip as a build secret, for the install steps only (pip here may
# go through a TLS-intercepting proxy); it is never part of a layer.
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
secret=()
[ -f "$ca" ] && secret=(--secret "id=ca,src=$ca")
start=$(date +%s)
buildah build --isolation chroot --format docker --layers \
    --build-arg "BASE=$BASE" "${secret[@]}" -t "$IMAGE" -f Dockerfile .
echo "built $IMAGE in $(( $(date +%s) - start )) s" >&2
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE"
