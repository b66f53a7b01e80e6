# syntax=docker/dockerfile:1
#
# sam2unet-assist: one image for the backend, the GPU workers, the trainer and the
# monitoring dashboard. CUDA comes from the torch wheel (its nvidia-* libraries), so the base
# is the small CUDA "base" image, whose CUDA version matches the wheel's index below.
# Build: docker build -t sam2unet-assist .   (see docs/deployment.md for the build args)

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG RQ_DASHBOARD_VERSION=0.9.0

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install --upgrade pip setuptools wheel

# 1. torch first, from the CUDA wheel index; the constraint keeps every later step from
#    replacing it.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && echo "torch==${TORCH_VERSION}" > /opt/venv/constraints.txt
ENV PIP_CONSTRAINT=/opt/venv/constraints.txt

# 2. sam2 without its declared dependencies (they would pull a second, different torch stack),
#    then the three it really needs.
RUN SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps sam2==1.1.0
RUN pip install hydra-core iopath tqdm

# 3. the project itself (and the queue dashboard of the monitoring profile).
WORKDIR /src
COPY pyproject.toml README.m[d] ./
COPY sam2unet ./sam2unet
COPY contracts ./contracts
COPY modelstore ./modelstore
COPY labelstudio ./labelstudio
COPY backend ./backend
COPY worker ./worker
COPY trainer ./trainer
COPY launcher ./launcher
COPY cli ./cli
RUN pip install . "rq-dashboard==${RQ_DASHBOARD_VERSION}" six

# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime

ARG TORCH_VERSION=2.13.0

ENV DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MODEL_DIR=/models

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 sam2unet \
 && useradd --uid 10001 --gid sam2unet --create-home --shell /usr/sbin/nologin sam2unet \
 && mkdir -p /models \
 && chown sam2unet:sam2unet /models

COPY --from=builder /opt/venv /opt/venv

# Fails the build when the environment is not what the services expect.
RUN --mount=type=bind,source=docker/verify_image.py,target=/tmp/verify_image.py \
    python /tmp/verify_image.py --torch "${TORCH_VERSION}" --cuda \
    --modules sam2 sam2unet cli backend.app worker.process rq_dashboard

# Named volumes mounted here start with this directory's owner (the unprivileged user).
VOLUME ["/models"]

USER sam2unet
WORKDIR /home/sam2unet
EXPOSE 9090

ENTRYPOINT ["sam2unet-assist"]
CMD ["backend", "--port", "9090"]
