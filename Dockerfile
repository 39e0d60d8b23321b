# GPU image for deface-infer. The full container work (non-root user, test stage, Apptainer) is issue 6.
ARG CUDA_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${CUDA_IMAGE}
WORKDIR /opt/deface
COPY pyproject.toml README.md ./
COPY deface ./deface
COPY configs ./configs
COPY weights ./weights
RUN pip install --no-cache-dir -e . \
 && cd weights && sha256sum -c SHA256SUMS
ENTRYPOINT ["deface-infer"]
CMD ["--help"]
