#!/usr/bin/env bash
# Builds imgserve's base image from Debian's packages, with no container registry:
# debootstrap a minimal bookworm (python3, python3-venv, ca-certificates), strip caches and docs,
# tar it, and import it FROM scratch with buildah. Prints the image's digest reference
# (localhost/imgserve-base@sha256:...), which the Dockerfile takes as BASE_IMAGE.
# Needs root, debootstrap and buildah (make tools installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."

SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NAME=${BASE_NAME:-localhost/imgserve-base}
OUT=build/base
ROOTFS=$OUT/rootfs
BUILDAH=(buildah --storage-driver "${BUILDAH_STORAGE_DRIVER:-vfs}")

mkdir -p "$OUT"
if [[ ! -x $ROOTFS/usr/bin/python3 ]]; then
  rm -rf "$ROOTFS"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$ROOTFS" "$MIRROR" >&2
fi
# What only the package manager needs, or nobody reads in a container.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/usr/share/locale/* "$ROOTFS"/var/log/*.log "$ROOTFS"/var/cache/debconf/*-old
tar --numeric-owner --sort=name --mtime='2024-01-01 00:00:00' -C "$ROOTFS" -cf "$OUT/rootfs.tar" .

"${BUILDAH[@]}" build --isolation chroot --format docker --quiet \
  -f scripts/image/base.Dockerfile -t "$NAME:$SUITE" "$OUT" >&2
digest=$("${BUILDAH[@]}" images --digests --format '{{.Digest}}' "$NAME:$SUITE" | head -n1)
[[ $digest == sha256:* ]] || { echo "no digest for $NAME:$SUITE" >&2; exit 1; }
echo "$NAME@$digest"
