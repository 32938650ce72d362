# fastvit_ssl on one CUDA image: torch + Triton, DALI (the CUDA 13 wheel), DeepSpeed, the project; pinned.
#   docker build --build-arg COMMIT=$(git rev-parse HEAD) -t fastvit_ssl .
#   docker run --gpus all --ipc=host -v /data/imagenet:/data IMAGE \
#       deepspeed train.py --config configs/vit_large.yaml data.root=/data run.out_dir=/workspace/runs
#   docker run --gpus all --ipc=host IMAGE python benchmarks/throughput.py --suite
FROM nvidia/cuda:13.0.1-cudnn-devel-ubuntu24.04

ARG COMMIT=unknown
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH FASTVIT_SSL_COMMIT=$COMMIT

# Python 3.11, the project's version (the one its CPU tests and benchmarks ran on), from the deadsnakes archive:
# Ubuntu 24.04 itself ships 3.12 only.
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev git \
        build-essential ninja-build libaio-dev && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

# The pins: what this image was built and tested with (tests/test_dockerfile.py keeps them inside setup.py's bounds).
RUN pip install torch==2.13.0 triton==3.9.0 \
    && pip install nvidia-dali-cuda130==2.4.0 deepspeed==0.19.8 mlxtend==0.25.0 pytest==9.2.0
# Optional, compiled against the image's CUDA (slow to build): docker build --build-arg FLASH_ATTN=1 ...
ARG FLASH_ATTN=0
RUN if [ "$FLASH_ATTN" = "1" ]; then pip install --no-build-isolation flash-attn==2.8.3.post2; fi

RUN useradd --create-home --uid 1000 trainer
WORKDIR /workspace/fastvit_ssl
COPY --chown=trainer:trainer . .
RUN pip install --no-deps -e . && chown trainer:trainer /workspace
USER trainer

# Any command runs from the project folder with the environment on PATH (deepspeed, torchrun, python).
CMD ["python", "train.py"]
