#!/usr/bin/env bash
# `make image`: builds localhost/modelfs:latest from docs/deploy/Dockerfile
# with podman or docker, whichever can build here (docs/deploy.md).
#
# The base image is the build argument BASE. Unless BASE is given, the
# python:3.11-slim-bookworm image is used when the engine has it or can pull
# it; where no registry answers, a base is made from Debian packages
# (debootstrap: python3, python3-venv, fuse3, ca-certificates) and kept as
# localhost/modelfs-base:bookworm, so later builds reuse it.
#
# Environment: IMAGE (default localhost/modelfs:latest), BASE, ENGINE.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/modelfs:latest}
REGISTRY_BASE=docker.io/library/python:3.11-slim-bookworm
DEBIAN_BASE=localhost/modelfs-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { printf 'make image: %s\n' "$*" >&2; }

pick_engine() {
    if [ -n "${ENGINE:-}" ]; then echo "$ENGINE"; return; fi
    # A docker client without a daemon answers --version but cannot build.
    if command -v podman >/dev/null; then echo podman; return; fi
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then echo docker; return; fi
    say "neither podman nor a running docker engine; install podman (apt-get install podman runc)"
    exit 1
}
ENGINE=$(pick_engine)

have_image() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

make_debian_base() {
    command -v debootstrap >/dev/null || {
        say "no registry answers and debootstrap is missing (apt-get install debootstrap)"
        exit 1
    }
    local dir
    dir=$(mktemp -d /var/tmp/modelfs-base.XXXXXX)
    say "making $DEBIAN_BASE from Debian packages (debootstrap, about 40 s)"
    debootstrap --variant=minbase --include=python3,python3-venv,fuse3,ca-certificates \
        bookworm "$dir" "$MIRROR" >"$dir.log" 2>&1 || {
        tail -20 "$dir.log" >&2
        rm -rf "$dir" "$dir.log"
        exit 1
    }
    rm -f "$dir.log"
    # What a registry's slim image leaves out too: package caches and docs.
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* \
        "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/locale/*
    # The mirror may serve a frozen snapshot whose Release files are past
    # their Valid-Until; the image's own apt-get must still accept them.
    printf 'Acquire::Check-Valid-Until "false";\n' >"$dir/etc/apt/apt.conf.d/99modelfs-snapshot"
    tar -C "$dir" -c . | "$ENGINE" import - "$DEBIAN_BASE" >/dev/null
    rm -rf "$dir"
}

if [ -z "${BASE:-}" ]; then
    if have_image "$REGISTRY_BASE" || timeout 60 "$ENGINE" pull -q "$REGISTRY_BASE" >/dev/null 2>&1; then
        BASE=$REGISTRY_BASE
    else
        say "cannot pull $REGISTRY_BASE; using a base made from Debian packages"
        have_image "$DEBIAN_BASE" || make_debian_base
        BASE=$DEBIAN_BASE
    fi
fi

args=(build -f docs/deploy/Dockerfile -t "$IMAGE" --build-arg "BASE=$BASE" --network host)
# The host's CA bundle, for an HTTPS proxy that re-signs PyPI (see the Dockerfile).
for ca in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
    if [ -s "$ca" ]; then args+=(--secret "id=ca,src=$ca"); break; fi
done
if [ "$ENGINE" = podman ]; then
    # crun, podman's default, refuses this host's hybrid cgroup layout.
    command -v runc >/dev/null && args+=(--runtime runc)
fi
say "building $IMAGE with $ENGINE on $BASE"
start=$(date +%s.%N)
"$ENGINE" "${args[@]}" . >&2
end=$(date +%s.%N)
size=$("$ENGINE" image inspect --format '{{.Size}}' "$IMAGE")
awk -v s="$size" -v a="$start" -v b="$end" -v i="$IMAGE" \
    'BEGIN { printf "make image: %s, %.0f MiB, built in %.0f s\n", i, s / 1048576, b - a }' >&2
