# syntax=docker/dockerfile:1
# Hospital site node: a Flower SuperNode and fedseg (the site's own installed code), one image for
# two processes that share a network namespace (a compose service pair, or one k8s pod):
#
#   flower-supernode ... --isolation process --superexec-auth-secret-file /run/secrets/superexec.secret
#       talks to the coordinator, queues one ClientApp task per message, runs none itself;
#   fedseg site runner --policy /data/policy.toml --audit-file ... --insecure \
#       --runtime-api-address 127.0.0.1:9094 --superexec-auth-secret-file /run/secrets/superexec.secret
#       takes each task, checks its app package against policy.toml [apps] before any of it is
#       installed or imported, then lets Flower run it (see docker/compose.yaml, deploy/k8s).
#
#   docker build -f docker/supernode.Dockerfile -t fedseg/supernode .
#
# Hospitals are offline: Flower never installs app dependencies at run time here, they are all
# in the image. The DICOM folder (runner only), the CA certificate, the node's private key and
# the SuperExec secret are mounted.

FROM python:3.11-slim AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
COPY . /src
RUN pip install /src

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/fedseg fedseg
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FLWR_HOME=/home/fedseg/.flwr \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
USER 10001:10001
WORKDIR /home/fedseg
# The ClientApps run in the runner's container (`fedseg site runner`), never in this process.
ENTRYPOINT ["flower-supernode"]
CMD ["--superlink", "superlink:8000", "--root-certificates", "/certs/ca.crt", "--auth-supernode-private-key", "/keys/supernode.key", "--isolation", "process", "--superexec-auth-secret-file", "/run/secrets/superexec.secret", "--node-config", "data-dir='/data' site-name='site'"]
