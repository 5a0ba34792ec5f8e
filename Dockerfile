# One image for every role (api, worker-gpu, worker-cpu, beat, migrate); the command picks the role.
# CUDA wheels of torch bring their own CUDA runtime; the host needs only the NVIDIA driver and container toolkit.
# gcc: torch.compile's Triton kernels build a small C launcher at run time. Compiled kernels are cached in the
# models volume (TORCHINDUCTOR_CACHE_DIR), so a restarted GPU worker warms up in seconds, not a minute.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/models/hf \
    TORCHINDUCTOR_CACHE_DIR=/models/inductor

RUN apt-get update \
    && apt-get install -y --no-install-recommends libjpeg62-turbo libwebp7 curl gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 app

WORKDIR /app
# torch and the dependencies first, in layers of their own: a change to the code does not download them again.
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md ./
RUN mkdir -p moderation api workers && touch moderation/__init__.py api/__init__.py workers/__init__.py \
    && pip install '.[quantization]' && pip uninstall -y moderation
COPY moderation ./moderation
COPY api ./api
COPY workers ./workers
COPY alembic ./alembic
COPY alembic.ini ./
RUN pip install --no-deps '.[quantization]'

RUN mkdir -p /data /models && chown app:app /data /models
USER app
ENV MODERATION_DATA_DIR=/data
EXPOSE 8000
# The API's check; compose turns it off for the workers and beat, which serve no HTTP.
HEALTHCHECK --interval=15s --timeout=3s CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--workers", "2", "--proxy-headers"]
