# The Home Assistant add-on's image, and the same recipe for a standalone box with a GPU.
#
# The add-on always runs on a CPU (Home Assistant's Supervisor passes no NVIDIA GPU), so PyTorch
# comes from its CPU wheel index by default: about 1 GB, where the CUDA build PyPI serves brings
# another 5 GB of CUDA libraries. For `docker run --gpus all`, build with a CUDA wheel index:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t qwen3-tts:cuda .
# Every other package comes at the exact version requirements/image.lock names, without a
# resolver run, so two builds install the same files. Models are downloaded at first start into
# /data, never baked in.
ARG BUILD_FROM=python:3.11-slim-bookworm
FROM ${BUILD_FROM}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/huggingface \
    HF_HUB_DISABLE_PROGRESS_BARS=1 \
    QWEN3TTS_DATA_DIR=/data

# g++: torch.compile (--compile) builds its CPU kernels and Triton's GPU launchers with it.
# tcmalloc: the codec's large activations cost glibc a page fault per page on every chunk; with
# tcmalloc several streams decode about 1.2x faster (set below, for the server only). The link
# gives it one path on every architecture.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libsndfile1 g++ libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(find /usr/lib -name libtcmalloc_minimal.so.4 | head -n 1)" /usr/local/lib/libtcmalloc_minimal.so.4 \
    && test -e /usr/local/lib/libtcmalloc_minimal.so.4

WORKDIR /app
COPY requirements ./requirements

# The lock first; then torch from its index (its own dependencies are in place already, so only
# torch comes from there, plus the CUDA libraries of a CUDA build); then, without dependencies,
# qwen-tts (requirements/no-deps.txt says why) and, below, this project.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# A mirror reached over plain HTTP must be named to be trusted (pip reads PIP_TRUSTED_HOST).
ARG PIP_TRUSTED_HOST=
RUN pip install --no-deps -r requirements/image.lock \
    && pip install --index-url "${TORCH_INDEX}" -r requirements/torch.txt \
    && pip install --no-deps -r requirements/no-deps.txt

# FlashAttention 2 for a CUDA build, where a prebuilt wheel matches it; never required.
ARG FLASH_ATTN_VERSION=2.8.3
COPY script/install-flash-attention ./script/
RUN FLASH_ATTN_VERSION="${FLASH_ATTN_VERSION}" python3 script/install-flash-attention

COPY pyproject.toml README.md ./
COPY wyoming_qwen3tts ./wyoming_qwen3tts
RUN pip install --no-deps .

COPY run.sh /run.sh

# Set last, so that pip and the compilers above ran on glibc's allocator as usual.
ENV LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4

EXPOSE 10200
# A first start downloads the model (minutes); the health check waits up to 30 minutes for it.
HEALTHCHECK --interval=30s --timeout=15s --start-period=30m --retries=3 \
    CMD python3 -m wyoming_qwen3tts.addon healthcheck || exit 1

CMD ["/run.sh"]
