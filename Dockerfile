# deface GPU image.
#   docker build -t deface .                       # runtime image (stage "runtime")
#   docker build --target test -t deface:test .    # runs the test suite while building
#   docker build --target smoke .                  # defaces the example head as the runtime user
#   docker run --gpus all --rm -v $PWD:/data deface /data/sub-01_T1w.nii.gz -o /data/defaced
# scripts/build_image.sh builds these stages with podman (also on a local Debian base, CPU torch).
# Base image, torch build and extras are build arguments, so a site can pin its own CUDA.
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS base
# TORCH_SPEC and TORCH_PIP_ARGS pick the torch build (default: CUDA 12.4 wheels from pytorch.org);
# PIP_CERT: a CA bundle for pip where the network needs one (empty: pip's own).
ARG TORCH_SPEC=torch==2.5.1
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu124"
ARG EXTRAS=qc,fast
ARG PIP_CERT=""
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Package versions follow the pinned base image; torch is pinned by TORCH_SPEC.
# hadolint ignore=DL3008,DL3013
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install ${PIP_CERT:+--cert "$PIP_CERT"} ${TORCH_PIP_ARGS} "${TORCH_SPEC}"
WORKDIR /opt/deface
COPY pyproject.toml README.md ./
COPY deface ./deface
COPY configs ./configs
COPY weights ./weights
# The shipped weights must match their published hashes, or the build stops.
WORKDIR /opt/deface/weights
RUN sha256sum --check --strict SHA256SUMS
WORKDIR /opt/deface
# hadolint ignore=DL3013
RUN pip install ${PIP_CERT:+--cert "$PIP_CERT"} ".[${EXTRAS}]"

FROM base AS test
COPY tests ./tests
COPY scripts ./scripts
# ../shared (data for the tests that need it) can be mounted at /opt/shared; without it they skip.
# hadolint ignore=DL3013
RUN pip install ${PIP_CERT:+--cert "$PIP_CERT"} ".[dev]" && python -m pytest -q -p no:cacheprovider

FROM base AS runtime
RUN useradd --create-home --uid 1000 deface
USER 1000
WORKDIR /data
ENTRYPOINT ["deface-infer"]
CMD ["--help"]

# Runs the installed tool as the runtime user, with the image's own copy of the weights.
FROM runtime AS smoke
WORKDIR /home/deface
RUN deface-infer --help > /dev/null \
 && deface-infer --example -o smoke --save-mask --device cpu \
 && example="$(python -c 'import deface.cli as c; print(c.EXAMPLE_HEAD)')" \
 && deface-check "$example" smoke/colin27_t1_2mm_defaced.nii.gz \
 && test -s smoke/colin27_t1_2mm_defacemask.nii.gz
