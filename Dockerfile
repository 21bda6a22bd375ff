# One image for the gateway and every stage worker; the command picks the role:
#   docker run -p 8000:8000 IMAGE                              gateway, all stages embedded
#   docker run -e ALTO_REDIS_URL=redis://... IMAGE             gateway in front of workers
#   docker run -e ALTO_REDIS_URL=redis://... IMAGE alto worker --pipeline P --stage S
# Variants (build argument EXTRAS, the pyproject extras installed):
#   docker build -t alto:0.1.0 .                                CPU: llama.cpp + bundled model
#   docker build --build-arg EXTRAS=vllm -t alto:0.1.0-vllm .   GPU: in-process vLLM
#   (add ,otel to EXTRAS for OpenTelemetry traces: EXTRAS=local,otel)
# The Helm chart (helm/alto) runs `alto serve` and `alto worker --metrics-port 9090`.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=local
# compilers only here: llama-cpp-python builds from source; the final stage gets the venv
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/alto
ENV PATH=/opt/alto/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CMAKE_ARGS="-DGGML_NATIVE=OFF"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app app
COPY orchestrator orchestrator
COPY workers workers
COPY bench bench
COPY examples examples
RUN pip install "/src[${EXTRAS}]"

FROM ${PYTHON_IMAGE}
# libgomp1: the OpenMP runtime llama.cpp links against (a library, not a build tool)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --user-group alto
COPY --from=build /opt/alto /opt/alto
WORKDIR /app
# relative paths in pipeline specs and ALTO_PIPELINES resolve here
COPY examples examples
ENV PATH=/opt/alto/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ALTO_HOST=0.0.0.0 \
    ALTO_PORT=8000 \
    ALTO_METRICS_PORT=9090 \
    ALTO_LOG_FORMAT=json \
    ALTO_LOG_LEVEL=info \
    ALTO_MODEL_DIR=/home/alto/.cache/alto/models
USER 10001:10001
EXPOSE 8000 9090
# the bundled model is assembled on first start into ALTO_MODEL_DIR (seconds), not baked
# into a layer; /healthz on the gateway's port or a worker's metrics port
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "workers.metrics", "probe"]
CMD ["alto", "serve"]
