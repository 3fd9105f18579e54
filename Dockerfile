# icepop GPU image: CUDA 13.0 (devel: nvcc for Triton / FlashInfer / DeepSpeed JIT kernels), Python 3.11,
# torch 2.13.0 (PyPI's CUDA 13.0 build, the one vllm 0.32.0 pins), vLLM 0.32.0, DeepSpeed 0.19.8,
# Ray 2.60.0 and this package, for a single GPU node or as the image of every node of a Ray cluster.
#
# Build (repository root; any x86-64 machine with Docker and internet access, no GPU needed):
#   docker build -t icepop:0.1.0 .
# Run (GPU node with NVIDIA driver >= 580 and the NVIDIA Container Toolkit); arguments go to
# `python -m icepop.train`, the default is the embedded tiny RLVR run on 3 GPUs:
#   docker run --rm --gpus all --ipc=host -v "$PWD/runs:/workspace/runs" icepop:0.1.0 \
#       +recipe=rlvr cluster=gpu model=qwen3-1.7b data=gsm8k
# As a Ray node: `docker run ... --network=host -e RAY_AUTH_TOKEN --entrypoint ray icepop:0.1.0 start --head
# --block` (docs/docker.md has the cluster recipe; docs/cluster.md, the token).
#
# tests/test_dockerfile.py lints this file with hadolint and replays its `pip install` / `uv pip install`
# steps (--dry-run for the project's own) in a fresh virtual environment against PyPI: keep every Python
# install step one such plain command in a RUN of its own.

FROM nvidia/cuda:13.0.2-devel-ubuntu24.04

ARG DEBIAN_FRONTEND=noninteractive

# Python 3.11 (the version the stack is measured on) from the deadsnakes PPA: Ubuntu 24.04 ships 3.12.
# gcc and python3.11-dev: Triton compiles a small C launcher at run time. wget: KubeRay's health probes.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates gpg-agent software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends \
        build-essential git python3.11 python3.11-dev python3.11-venv wget \
    && rm -rf /var/lib/apt/lists/*

# A non-root user, uid and gid 1000 (Ubuntu 24.04's own `ubuntu` user holds them: remove it first), the
# working directory it writes runs/ into, and its cache folder (Hugging Face hub, icepop's SFT warm-up,
# kernel caches), created here so that a named volume mounted on it belongs to that user too.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 icepop \
    && useradd --no-log-init --create-home --uid 1000 --gid 1000 --shell /bin/bash icepop \
    && install --directory --owner=icepop --group=icepop /workspace /home/icepop/.cache

# One virtual environment for everything, owned by root and read-only to the run's user.
# RAY_AUTH_MODE=token: Ray token authentication on every Ray node, job submission and driver started from
# this image. The token is never in the image: each container gets it at run time, as RAY_AUTH_TOKEN
# (`docker run -e RAY_AUTH_TOKEN`, or KubeRay's Secret) or as a mounted file named by RAY_AUTH_TOKEN_PATH,
# and `ray start` without one fails. A run on one machine (the default command) starts its own Ray on
# 127.0.0.1 with a token of its own. `-e RAY_AUTH_MODE=disabled` turns authentication off (docs/cluster.md).
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    RAY_AUTH_MODE=token
RUN python3.11 -m venv "$VIRTUAL_ENV"

ARG UV_VERSION=0.13.8
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

WORKDIR /opt/icepop
COPY pyproject.toml README.md ./
COPY icepop ./icepop
COPY conf ./conf
COPY recipes ./recipes

# DS_BUILD_OPS=0: DeepSpeed installs without compiling its ops; any op it needs is JIT-built at first use
# with this image's nvcc (icepop itself uses torch's AdamW, so none is needed by default).
# cuda-python>=13: with nothing else said, uv satisfies FlashInfer's unpinned `cuda-python` with the old
# 12.6.2.post1 wheel, which carries CUDA 12 bindings that overwrite cuda-bindings 13's files.
RUN DS_BUILD_OPS=0 uv pip install --no-cache --compile-bytecode ".[gpu,loggers]" "cuda-python>=13"

WORKDIR /workspace
USER 1000:1000

ENTRYPOINT ["python", "-m", "icepop.train"]
CMD ["+recipe=rlvr", "cluster=gpu"]
