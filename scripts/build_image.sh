#!/usr/bin/env bash
# Build and check the container image with podman (no Docker engine needed):
#   scripts/build_image.sh                 # CUDA base (nvidia/cuda, pulled), CUDA torch
#   scripts/build_image.sh --local         # a local Debian base (see ../shared/notes/containers.md), CPU torch
# Builds the "test" stage (the test suite runs inside the image, with ../shared mounted when it
# exists) and the "smoke" stage (deface-infer --example and deface-check as the non-root runtime
# user, with the image's own weights), then tags the runtime image deface:latest.
# Environment: BASE_IMAGE (local base, default localhost/debian-base:bookworm), WHEELS (a folder of
# wheels holding the CPU torch, default /opt/wheels), TORCH_SPEC (default torch==2.13.0+cpu locally).
set -euo pipefail
cd "$(dirname "$0")/.."
local_base=0
[ "${1:-}" = "--local" ] && local_base=1
args=(--isolation=chroot --network host --layers --format docker)  # docker format: SHELL is honoured
cert=$(python3 -m pip config list 2>/dev/null | sed -n "s/^global.cert='\(.*\)'$/\1/p" | head -n 1)
if [ -n "$cert" ] && [ -f "$cert" ]; then
  args+=(-v "$cert:$cert:ro" --build-arg "PIP_CERT=$cert")
fi
if [ -d ../shared/data ]; then
  args+=(-v "$(cd ../shared && pwd):/opt/shared:ro")
fi
if [ "$local_base" = 1 ]; then
  wheels=${WHEELS:-/opt/wheels}
  args+=(--build-arg "CUDA_IMAGE=${BASE_IMAGE:-localhost/debian-base:bookworm}"
         --build-arg "TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0+cpu}"
         --build-arg "TORCH_PIP_ARGS=--find-links $wheels" -v "$wheels:$wheels:ro")
fi
set -x
podman build "${args[@]}" --target test -t deface:test .
podman build "${args[@]}" --target smoke -t deface:smoke .
podman build "${args[@]}" --target runtime -t deface:latest .
podman image ls --filter reference=deface
