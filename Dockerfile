# GPT-2 text-generation server on MindSpore (CPU image).
# Build: docker build -t gpt2-ms-server .
# Run:   docker run --rm -p 8000:8000 gpt2-ms-server
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    GPT2_COMPILE_CACHE=/var/cache/gpt2-ms/graphs \
    GPT2_KERNEL_CACHE=/var/cache/gpt2-ms/kernels \
    GPT2_PACKED_CACHE=/var/cache/gpt2-ms/packed

# gcc + libc6-dev: some wheels compile at install time, and model/kernels builds its CPU kernels on first use
# (g++: with the ops' shape functions, so that one graph serves every step size);
# libgomp1: MindSpore's CPU kernels use OpenMP.
# Debian's stable security updates are wanted here, so versions are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libc6-dev libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# Dependencies first so code edits do not reinstall MindSpore (~800 MB).
COPY pyproject.toml README.md ./
COPY tokenizer/ tokenizer/
COPY model/ model/
COPY serving/ serving/
COPY tools/ tools/
COPY textgen/ textgen/
COPY configs/ configs/
COPY models/ models/
RUN pip install --no-cache-dir .

RUN useradd --create-home --uid 10001 gpt2 && mkdir -p /var/cache/gpt2-ms && chown gpt2 /var/cache/gpt2-ms
USER 10001

EXPOSE 8000
# Inside a container the server must listen on all interfaces to be reachable through -p.
CMD ["python", "-m", "serving", "--model", "/app/models/default", "--host", "0.0.0.0", "--port", "8000"]
