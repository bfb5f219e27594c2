# syntax=docker/dockerfile:1
# Hospital site node: a Flower SuperNode with fedseg's ClientApp (client.app:app) installed.
#
#   docker build -f docker/supernode.Dockerfile -t fedseg/supernode .
#   docker run -v /srv/dicom/fedseg:/data:ro -v $PWD/certs/ca.crt:/certs/ca.crt:ro \
#       -v $PWD/certs/supernode-1.key:/keys/supernode.key:ro fedseg/supernode \
#       --superlink coordinator.example.org:8000 --root-certificates /certs/ca.crt \
#       --auth-supernode-private-key /keys/supernode.key \
#       --node-config "data-dir='/data' site-name='hospital-a'"
#
# Hospitals are offline: Flower never installs app dependencies at run time here, they are all
# in the image. The DICOM folder, the CA certificate and the node's private key are mounted.

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
# The ClientApp runs in a subprocess (flower-superexec -> flwr-clientapp) of this container.
ENTRYPOINT ["flower-supernode"]
CMD ["--superlink", "superlink:8000", "--root-certificates", "/certs/ca.crt", "--auth-supernode-private-key", "/keys/supernode.key", "--node-config", "data-dir='/data' site-name='site'"]
