# One image for the Home Assistant add-on and for `docker run --gpus all`: PyTorch's CUDA wheels
# carry their own CUDA runtime, so the same image uses an NVIDIA GPU where the host exposes one
# and the CPU everywhere else. Models are downloaded at first start into /data, never baked in.
ARG BUILD_FROM=python:3.11-slim-bookworm
FROM ${BUILD_FROM}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/huggingface \
    QWEN3TTS_DATA_DIR=/data

# g++: torch.compile (--compile) builds its CPU kernels and Triton's GPU launchers with it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libsndfile1 g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# torch first and pinned, then qwen-tts without its dependencies (they pull torchaudio, sox,
# onnxruntime and gradio, which only its 25 Hz tokenizer and demo use), then this package.
ARG TORCH_SPEC=torch==2.8.0
ARG QWEN_TTS_SPEC=qwen-tts==0.1.1
RUN pip install "${TORCH_SPEC}" \
    && pip install --no-deps "${QWEN_TTS_SPEC}"

# FlashAttention 2 where a prebuilt wheel matches this torch and CPU; never required.
ARG FLASH_ATTN_VERSION=2.8.3
RUN if [ "$(uname -m)" = "x86_64" ]; then \
        torch_mm="$(python3 -c 'import torch; print(".".join(torch.__version__.split(".")[:2]))')"; \
        abi="$(python3 -c 'import torch; print(str(torch._C._GLIBCXX_USE_CXX11_ABI).upper())')"; \
        wheel="flash_attn-${FLASH_ATTN_VERSION}+cu12torch${torch_mm}cxx11abi${abi}-cp311-cp311-linux_x86_64.whl"; \
        pip install "https://github.com/Dao-AILab/flash-attention/releases/download/v${FLASH_ATTN_VERSION}/${wheel}" \
            || echo "No prebuilt FlashAttention 2 wheel for torch ${torch_mm}: the server uses sdpa"; \
    fi

COPY pyproject.toml README.md ./
COPY wyoming_qwen3tts ./wyoming_qwen3tts
RUN pip install .

COPY run.sh /run.sh

EXPOSE 10200
HEALTHCHECK --interval=30s --timeout=15s --start-period=30m --retries=3 \
    CMD python3 -m wyoming_qwen3tts.addon healthcheck || exit 1

CMD ["/run.sh"]
