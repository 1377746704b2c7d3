#!/usr/bin/env bash
# `make image`: the wheels (host pip, which has the registry's credentials and CA), the Debian base
# (debian-base.sh), then the gateway image with buildah (vfs storage, chroot isolation: no daemon,
# no registry). Writes build/image/facts.json: image reference, size, build seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
IMAGE=${IMAGE:-localhost/imgserve:$("$PY" -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')}
BUILDAH=(buildah --storage-driver "${BUILDAH_STORAGE_DRIVER:-vfs}")
start=$(date +%s)

rm -rf build/wheels && mkdir -p build/wheels build/wheels-export build/image
"$PY" -m pip wheel --quiet --no-deps --wheel-dir build/wheels .
# Resolve the serve extra for the base image's Python (3.11, manylinux x86_64), binary wheels only.
"$PY" -m pip download --quiet --only-binary=:all: --dest build/wheels \
  --python-version 3.11 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 --implementation cp \
  "$(ls build/wheels/imgserve-*.whl)[serve]"

base=$(scripts/image/debian-base.sh)
"${BUILDAH[@]}" build --isolation chroot --format docker --layers \
  --build-arg "BASE_IMAGE=$base" --target runtime -t "$IMAGE" -f Dockerfile . >&2

size=$("${BUILDAH[@]}" images --format '{{.Size}}' "$IMAGE" | head -n1)
cat > build/image/facts.json <<JSON
{"image": "$IMAGE", "base": "$base", "size": "$size", "build_seconds": $(( $(date +%s) - start ))}
JSON
cat build/image/facts.json
