# unimo-bids BIDS-App image.
#   CPU (default):  docker build -t unimo-bids .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cuda -t unimo-bids:cuda .
#                   (PyPI's torch wheels bundle the CUDA runtime; run with --gpus all)
# Usage: docs/usage.md. The install steps are docker/install.sh, which CI also runs in a fresh
# venv (docker/check_install.sh).
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VARIANT=cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    TEMPLATEFLOW_HOME=/opt/templateflow
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY docker ./docker
COPY unimo_bids ./unimo_bids
# The package, then the templates it reads, so that the image runs offline.
RUN sh docker/install.sh /src "${TORCH_VARIANT}" \
    && python docker/fetch_templates.py

FROM ${PYTHON_IMAGE}
ARG TORCH_VARIANT=cpu
ARG VERSION=0.0.0
LABEL org.opencontainers.image.title="unimo-bids" \
      org.opencontainers.image.description="UniMo motion correction as a BIDS-App (torch ${TORCH_VARIANT} build)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/usage.md"
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/templateflow /opt/templateflow
# One thread per library by default: --omp-nthreads and the nipype plugin set the real counts.
ENV PATH=/opt/venv/bin:$PATH \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    NIPYPE_NO_ET=1 \
    UNIMO_BIDS_CONTAINER=docker \
    HOME=/home/unimo \
    MPLCONFIGDIR=/home/unimo/.config/matplotlib \
    PYTHONUNBUFFERED=1
# A non-root user, and a HOME that any UID (docker run -u, Apptainer) can write, as fMRIPrep does.
RUN useradd --create-home --shell /bin/bash --uid 1000 unimo \
    && mkdir -p /home/unimo/.config/matplotlib /home/unimo/.cache \
    && chmod -R go=u /home/unimo
USER 1000:1000
WORKDIR /home/unimo
ENTRYPOINT ["unimo-bids"]
