# SuperExec image for asyncfl with CUDA torch: the ClientApp-executing containers of the GPU
# override (../docker-compose.gpu.yml). The CUDA runtime comes inside the torch wheels; the host
# needs only the NVIDIA driver and the NVIDIA Container Toolkit (`gpus`/device reservations).
#
# Build from the repository root:
#   docker build -f docker/superexec-gpu.Dockerfile -t asyncfl-superexec:gpu .
# BASE_IMAGE as in superexec.Dockerfile: Flower's image (default) or the local stand-in.
ARG FLWR_VERSION=1.42.0
ARG BASE_IMAGE=flwr/superexec:${FLWR_VERSION}
FROM ${BASE_IMAGE}

# PyPI's Linux x86_64 torch wheels are CUDA 12 builds; pin the index to pick another CUDA.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

USER root
RUN mkdir -p /results /cache && chown app:app /results /cache
USER app

WORKDIR /app
RUN python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
COPY --chown=app:app pyproject.toml LICENSE ./
COPY --chown=app:app asyncfl ./asyncfl
# As in superexec.Dockerfile: flwr comes with the base image; the README is not copied.
RUN sed -i -e '/"flwr\[simulation\]/d' -e '/^readme *=/d' pyproject.toml \
    && python -m pip install --no-cache-dir . \
    && python -c "import flwr, torch, transformers, asyncfl; print('flwr', flwr.__version__, 'torch', torch.__version__, 'cuda', torch.version.cuda)"

# Caches on the /cache volume: data/token caches (XDG), Hugging Face files, per-node state.
ENV XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    ASYNCFL_NODE_DIR=/cache/asyncfl/node-state \
    FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

ENTRYPOINT ["flower-superexec"]
