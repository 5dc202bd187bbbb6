# embedlift: the service on a CPU build of torch, with the packaged all-MiniLM-L6-v2 baked in (serves offline).
#
#   docker build -t embedlift .                                  (a registry and network: torch from the CPU index)
#   scripts/build-image.sh                                       (no engine, no registry: buildah + debootstrap)
#   docker run -p 8080:8080 -v embedlift-data:/data -v $PWD/adapters:/adapters embedlift
#
# Every setting is an EMBEDLIFT_* variable (see `embedlift serve --help`); flags after the image name too.
ARG BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------- build
FROM ${BASE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=120
RUN python3 -m venv /opt/embedlift

# torch first and CPU only: a wheel from the context's wheels/ folder when there is one, else the CPU index.
# A CA bundle passed as the build secret `ca` (a proxy's) is used by pip in this step only, never stored.
RUN --mount=type=bind,source=wheels,target=/wheels \
    --mount=type=secret,id=ca \
    set -e; \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    whl=$(ls /wheels/torch-${TORCH_VERSION}*.whl 2>/dev/null | head -n1 || true); \
    if [ -n "$whl" ]; then /opt/embedlift/bin/pip install "$whl"; \
    else /opt/embedlift/bin/pip install --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"; fi

# The project with its openvino extra (the default runtime on a CPU), torch held where it is (a newer torch
# from PyPI would be a CUDA build of several GB).
COPY pyproject.toml README.md /src/
COPY models /src/models
COPY training /src/training
COPY service /src/service
COPY client /src/client
RUN --mount=type=secret,id=ca \
    set -e; \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt; \
    /opt/embedlift/bin/pip install -c /tmp/constraints.txt /src/client "/src[openvino,postgres]"; \
    HF_HUB_OFFLINE=1 /opt/embedlift/bin/python -c "from embedlift.models.encoders import LocalEncoder; print(LocalEncoder().fingerprint)"

# ---------------------------------------------------------------------------------------------- runtime
FROM ${BASE}
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/embedlift embedlift \
    && mkdir -p /data /adapters && chown embedlift:embedlift /data /adapters
COPY --from=build /opt/embedlift /opt/embedlift
ENV PATH=/opt/embedlift/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    EMBEDLIFT_HOST=0.0.0.0 \
    EMBEDLIFT_PORT=8080 \
    EMBEDLIFT_DATA_DIR=/data \
    EMBEDLIFT_ADAPTERS_DIR=/adapters
USER embedlift
WORKDIR /home/embedlift
VOLUME ["/data", "/adapters"]
EXPOSE 8080
# /ready is public (no key needed): 200 once the model, adapters and collections are loaded.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('EMBEDLIFT_PORT', '8080'), timeout=2)"]
# uvicorn drains in-flight requests on SIGTERM and `embedlift serve` then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["embedlift", "serve"]
