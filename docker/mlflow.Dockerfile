# syntax=docker/dockerfile:1
# MLflow tracking server and Model Registry for a real deployment (instead of the embedded
# sqlite store under $FEDSEG_HOME). Backend store and artifacts live on the /mlflow volume;
# artifacts are proxied by the server (mlflow-artifacts:/), so clients need only its URL.
#
#   docker build -f docker/mlflow.Dockerfile -t fedseg/mlflow .
#   docker run -p 5000:5000 -v mlflow-data:/mlflow fedseg/mlflow
#
# Holds MLflow only (the version pinned in pyproject.toml); no torch, no fedseg code.
# Expose it beyond the compose network only behind an authenticating TLS proxy.

FROM python:3.11-slim AS build
ARG MLFLOW_SPEC="mlflow==3.17.2"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install "${MLFLOW_SPEC}"

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/mlflow mlflow \
    && mkdir -p /mlflow/artifacts \
    && chown -R 10001:10001 /mlflow
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/mlflow
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["mlflow", "server"]
CMD ["--backend-store-uri", "sqlite:////mlflow/mlflow.db", "--artifacts-destination", "/mlflow/artifacts", "--serve-artifacts", "--host", "0.0.0.0", "--port", "5000", "--allowed-hosts", "mlflow,mlflow:5000,localhost,localhost:5000,127.0.0.1,127.0.0.1:5000"]
