# syntax=docker/dockerfile:1
# fedseg inference service: `fedseg serve` answers POST /v1/predict with the registry's champion.
#
#   docker build -f docker/serve.Dockerfile -t fedseg/serve .
#   docker run -p 8080:8080 -e FEDSEG_MLFLOW_TRACKING_URI=http://mlflow:5000 fedseg/serve
#
# The model is read from the registry at start-up (FEDSEG_MLFLOW_TRACKING_URI, or an embedded
# store mounted at $FEDSEG_HOME); no weights, certificates or credentials are in the image.
# GPU site: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (its CUDA build).

FROM python:3.11-slim AS build
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first (CPU wheel unless overridden), so that `pip install .` keeps it.
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
COPY . /src
RUN pip install /src

FROM python:3.11-slim
# g++: torch.compile (TorchInductor) compiles the forward's kernels when a model loads, cached
# under $FEDSEG_HOME/cache/torchinductor; without a compiler the eager network serves.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/fedseg fedseg \
    && mkdir -p /var/lib/fedseg \
    && chown 10001:10001 /var/lib/fedseg
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    FEDSEG_HOME=/var/lib/fedseg \
    FEDSEG_SERVE_DEVICE=auto
USER 10001:10001
WORKDIR /home/fedseg
EXPOSE 8080
# 200 once the model is loaded; urlopen raises (exit 1) on 503 or no answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health/ready', timeout=4)"]
ENTRYPOINT ["fedseg", "serve"]
CMD ["--model", "models:/fedseg-unet@champion", "--host", "0.0.0.0", "--port", "8080"]
