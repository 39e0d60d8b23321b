# deface GPU image.
#   docker build -t deface .                       # runtime image (stage "runtime")
#   docker build --target test -t deface:test .    # runs the test suite while building
#   docker run --gpus all --rm -v $PWD:/data deface /data/sub-01_T1w.nii.gz -o /data/defaced
# Base image, torch build and extras are build arguments, so a site can pin its own CUDA.
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

FROM ${CUDA_IMAGE} AS base
ARG TORCH_VERSION=2.5.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG EXTRAS=qc
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Package versions follow the pinned base image; torch is pinned by TORCH_VERSION.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
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
RUN pip install ".[${EXTRAS}]"

FROM base AS test
COPY tests ./tests
COPY scripts ./scripts
# hadolint ignore=DL3013
RUN pip install ".[dev]" && python -m pytest -q

FROM base AS runtime
RUN useradd --create-home --uid 1000 deface
USER 1000
WORKDIR /data
ENTRYPOINT ["deface-infer"]
CMD ["--help"]
