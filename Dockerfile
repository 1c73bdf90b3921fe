# PLACEHOLDER until the deployment issue writes the real image (multi-stage, non-root, GPU
# variant, pinned base digest). This minimal CPU image is valid and honest: it installs the repo
# as the Makefile does (torch 2.13.0 first, then everything under the torch constraint) and runs
# proxmo-server with its embedded defaults (gRPC 50051, HTTP 8000).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app
COPY deploy/constraints.txt deploy/constraints.txt
# torch first, pinned. From PyPI this is the (large) CUDA build; pass the URL of a CPU-only wheel
# index as TORCH_INDEX_URL for a small CPU image. The deployment issue settles this.
ARG TORCH_INDEX_URL=""
RUN pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
COPY pyproject.toml README.md ./
COPY clients/python clients/python
COPY service service
RUN pip install -c deploy/constraints.txt ./clients/python .

EXPOSE 50051 8000
ENTRYPOINT ["proxmo-server"]
CMD ["--host", "0.0.0.0"]
