#!/bin/sh
# Entrypoint of the modelfs container image (docs/deploy/Dockerfile).
#
# Mounts $MODELFS_SOURCE (s3://BUCKET[/PREFIX]) on $MODELFS_MOUNTPOINT
# (default /models) in the foreground, so the daemon is the container's main
# process: `docker stop` or a pod deletion sends it SIGTERM and it unmounts
# before it exits. $MODELFS_OPTIONS takes fstab-style options
# (endpoint_url=...,cache_dir=...); arguments starting with "-" are passed to
# `modelfs mount`. Any other first argument is run as a command instead, e.g.
# `modelfs warm /models/llama`.
set -eu

if [ "$#" -gt 0 ] && [ "${1#-}" = "$1" ]; then
    exec "$@"
fi

: "${MODELFS_SOURCE:?set MODELFS_SOURCE=s3://BUCKET[/PREFIX]}"
mnt="${MODELFS_MOUNTPOINT:-/models}"
mkdir -p "$mnt"
set -- "$MODELFS_SOURCE" "$mnt" --foreground "$@"
if [ -n "${MODELFS_OPTIONS:-}" ]; then
    set -- "$@" -o "$MODELFS_OPTIONS"
fi
exec modelfs mount "$@"
