# The worker image: gdc-worker and the example services, run with `gdc-worker run ...`.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gdc_worker ./gdc_worker
RUN pip install --no-cache-dir .
COPY examples ./examples
USER nobody
ENTRYPOINT ["gdc-worker"]
