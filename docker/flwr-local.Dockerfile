# A local stand-in for Flower's images (flwr/superlink, flwr/supernode, flwr/superexec) where no
# registry is reachable: Debian's Python with flwr installed in a venv, run as uid 49999 "app"
# like the official images. It provides flower-superlink, flower-supernode and flower-superexec;
# docker-compose.yml picks the program with each service's `entrypoint`.
#
# Build it with docker/build-local-base.sh (makes the Debian base with debootstrap first and
# passes this machine's extra CA certificates in a temporary build context):
#   docker/build-local-base.sh
# By hand, from any Debian image, with a context folder that holds ca/ (empty, or the *.crt
# files a TLS-intercepting proxy needs):
#   mkdir -p /tmp/ctx/ca && docker build -f docker/flwr-local.Dockerfile \
#     --build-arg DEBIAN_IMAGE=debian:bookworm -t local/flwr:1.42.0 /tmp/ctx
# Python must match the torch wheel the SuperExec image installs (bookworm: 3.11).
ARG DEBIAN_IMAGE=local/debian:bookworm
FROM ${DEBIAN_IMAGE}
ARG FLWR_VERSION=1.42.0

# Extra CA certificates (a TLS-intercepting proxy in front of the package indexes): installed
# in the image's trust store, which pip is pointed at (/etc/pip.conf). Usually none.
COPY ca/ /tmp/ca/
RUN set -eux; export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
    if ls /tmp/ca/*.crt >/dev/null 2>&1; then \
        cp /tmp/ca/*.crt /usr/local/share/ca-certificates/; update-ca-certificates; \
    fi; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /tmp/ca; \
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > /etc/pip.conf; \
    groupadd --gid 49999 app; \
    useradd --uid 49999 --gid 49999 --home-dir /app --create-home --shell /bin/bash app; \
    python3 -m venv /python/venv; \
    chown -R app:app /python

USER app
ENV PATH=/python/venv/bin:$PATH \
    HOME=/app \
    PYTHONUNBUFFERED=1
WORKDIR /app
RUN python -m pip install --no-cache-dir "flwr==${FLWR_VERSION}" \
    && flower-superlink --help >/dev/null && flower-supernode --help >/dev/null \
    && flower-superexec --help >/dev/null \
    && python -c "import flwr, sys; print('flwr', flwr.__version__, 'python', sys.version.split()[0])"
