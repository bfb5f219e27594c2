# syntax=docker/dockerfile:1
# Coordinator's ServerApp side: fedseg installed, run by Flower's SuperExec.
#
# In flwr 1.41 the SuperLink started with `--isolation process` does not run the ServerApp
# itself: a separate `flower-superexec` connects to the SuperLink's Runtime API (same port as
# the Fleet and Control APIs; the SuperLink's loopback address 127.0.0.1:9091, so this container
# shares its network namespace), takes each run's ServerApp task and starts
# `flwr-serverapp` (per-run token) for it, which runs fedseg's `server.app:app` and publishes
# to MLflow (FEDSEG_MLFLOW_TRACKING_URI).
#
#   docker build -f docker/serverapp.Dockerfile -t fedseg/serverapp .

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
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/fedseg fedseg \
    && mkdir -p /var/lib/fedseg \
    && chown 10001:10001 /var/lib/fedseg
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FEDSEG_HOME=/var/lib/fedseg \
    FLWR_HOME=/home/fedseg/.flwr \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
USER 10001:10001
WORKDIR /home/fedseg
ENTRYPOINT ["flower-superexec"]
CMD ["--runtime-api-address", "127.0.0.1:9091", "--root-certificates", "/certs/ca.crt"]
