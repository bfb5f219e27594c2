# syntax=docker/dockerfile:1
# Coordinator: the Flower SuperLink (Fleet, Control and Runtime APIs over HTTPS on one port),
# bound to loopback (127.0.0.1:9091): the gateway image (docker/gateway.Dockerfile), in the same
# network namespace, is what hospitals (Fleet API only) and operators (Control API, client
# certificate) reach; the serverapp image dials the Runtime API on loopback.
#
#   docker build -f docker/superlink.Dockerfile -t fedseg/superlink .
#
# It runs with `--isolation process`: the ServerApp runs in the serverapp image
# (docker/serverapp.Dockerfile), so this image holds Flower only (the version pinned in
# pyproject.toml), no torch and no fedseg code. TLS certificate and key are mounted at /certs,
# the state database lives on the /var/lib/superlink volume. SuperNode authentication is on:
# register each site's public key with `flwr supernode register` before it connects.

FROM python:3.11-slim AS build
ARG FLWR_SPEC="flwr==1.41.0"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "${FLWR_SPEC}"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/flwr flwr \
    && mkdir -p /var/lib/superlink \
    && chown 10001:10001 /var/lib/superlink
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLWR_HOME=/home/flwr/.flwr \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
USER 10001:10001
WORKDIR /home/flwr
ENTRYPOINT ["flower-superlink"]
CMD ["--ssl-ca-certfile", "/certs/ca.crt", "--ssl-certfile", "/certs/superlink.crt", "--ssl-keyfile", "/certs/superlink.key", "--database", "/var/lib/superlink/state.db", "--enable-supernode-auth", "--isolation", "process", "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", "9091"]
