# SuperExec image for asyncfl (CPU): runs `flwr-serverapp` / `flwr-clientapp` task processes in
# process isolation (see ../docker-compose.yml). Flower ships the app code itself (the FAB) with
# every run; the image provides its dependencies, and the package is installed too, which puts
# `asyncfl-superexec` on PATH (the ClientApp containers use it as their entrypoint: Flower's
# SuperExec with ClientApp processes forked warm, asyncfl/deploy/launcher.py).
#
# Build from the repository root:
#   docker build -f docker/superexec.Dockerfile -t asyncfl-superexec:cpu .
# BASE_IMAGE: Flower's official image (default), or the local stand-in made by
# docker/build-local-base.sh where no registry is reachable (--build-arg BASE_IMAGE=local/flwr:1.42.0).
# FLWR_VERSION must match the flwr installed where `flwr run` is called and lie in the range
# pinned in pyproject.toml (tests/test_docker.py checks the default).
ARG FLWR_VERSION=1.42.0
ARG BASE_IMAGE=flwr/superexec:${FLWR_VERSION}
FROM ${BASE_IMAGE}

# CPU-only torch wheels (the default PyPI wheel would pull the CUDA runtime, ~3 GB). A torch
# wheel of TORCH_VERSION in docker/local/wheels/ (git-ignored; scripts/compose-demo.sh puts this
# machine's CPU wheel there) is installed instead of downloading one.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

USER root
# Writable mount points for the app user (uid 49999 in the flwr images): results and caches.
RUN mkdir -p /results /cache && chown app:app /results /cache
USER app

WORKDIR /app
COPY --chown=app:app docker/local/ /tmp/local/
RUN set -e; \
    whl=$(ls /tmp/local/wheels/torch-"${TORCH_VERSION}"[+-]*.whl 2>/dev/null | head -n 1); \
    if [ -n "$whl" ]; then \
        echo "torch from the local wheel $(basename "$whl")"; \
        python -m pip install --no-cache-dir "$whl"; \
    else \
        python -m pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    fi; \
    rm -rf /tmp/local/wheels
# flwr is already in the base image at FLWR_VERSION: drop the `flwr[simulation]` requirement
# (it would add Ray) and the README reference (not copied). Dependencies first, against an empty
# package, so that this layer stays cached while only the code changes.
COPY --chown=app:app pyproject.toml LICENSE ./
RUN sed -i -e '/"flwr\[simulation\]/d' -e '/^readme *=/d' pyproject.toml \
    && mkdir asyncfl && touch asyncfl/__init__.py \
    && python -m pip install --no-cache-dir . \
    && rm -rf asyncfl
COPY --chown=app:app asyncfl ./asyncfl
RUN python -m pip install --no-cache-dir --no-deps --force-reinstall . \
    && python -c "import flwr, torch, transformers, asyncfl.deploy.launcher, asyncfl.client.app; print('flwr', flwr.__version__, 'torch', torch.__version__)"

# Caches on the /cache volume: data/token caches (XDG), Hugging Face files, per-node state.
ENV XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    ASYNCFL_NODE_DIR=/cache/asyncfl/node-state \
    FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1

ENTRYPOINT ["flower-superexec"]
