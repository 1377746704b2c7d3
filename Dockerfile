# syntax=docker/dockerfile:1
# The imgserve gateway image (target `runtime`, the default) and the training/export tools image
# (target `export`, with torch) for building model repositories in a Kubernetes Job.
#
# BASE_IMAGE must be pinned by digest (name@sha256:...). `make image` builds it from Debian
# bookworm packages with debootstrap (scripts/image/debian-base.sh: Python 3.11 from Debian, no
# compilers) and passes its digest; push that base to your registry to build elsewhere.
# Python packages come from build/wheels (scripts/image/build.sh fills it on the host), so every RUN works
# without network access and the image holds exactly the wheels that were checked.
ARG BASE_IMAGE

# ---------------------------------------------------------------- build: the gateway's venv
FROM ${BASE_IMAGE} AS build
COPY build/wheels/ /wheels/
# `serve` extra only: onnxruntime, gRPC and the Triton client; torch stays out of the gateway.
RUN python3 -m venv /opt/imgserve \
 && /opt/imgserve/bin/pip install --no-cache-dir --no-index --find-links /wheels \
      "$(ls /wheels/imgserve-*.whl)[serve]" \
 && /opt/imgserve/bin/pip uninstall --yes pip setuptools \
 && /opt/imgserve/bin/python -m compileall -q /opt/imgserve

# ---------------------------------------------------------------- export: training tools (torch)
FROM ${BASE_IMAGE} AS export-build
COPY build/wheels-export/ /wheels/
RUN python3 -m venv /opt/imgserve \
 && /opt/imgserve/bin/pip install --no-cache-dir --no-index --find-links /wheels \
      "$(ls /wheels/imgserve-*.whl)[export]" \
 && /opt/imgserve/bin/pip uninstall --yes pip setuptools

FROM ${BASE_IMAGE} AS export
COPY --from=export-build /opt/imgserve /opt/imgserve
ENV PATH=/opt/imgserve/bin:/usr/local/bin:/usr/bin:/bin \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /work
ENTRYPOINT ["/opt/imgserve/bin/imgserve"]
CMD ["build-repo", "--model-repository", "/models"]

# ---------------------------------------------------------------- runtime: the gateway
FROM ${BASE_IMAGE} AS runtime
COPY --from=build /opt/imgserve /opt/imgserve
# Mount point of the model repository (a read-only root filesystem cannot create it at run time).
RUN mkdir /models
ENV PATH=/opt/imgserve/bin:/usr/local/bin:/usr/bin:/bin \
    HOME=/tmp \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    IMGSERVE_HOST=0.0.0.0 \
    IMGSERVE_MODEL_REPOSITORY=/models \
    IMGSERVE_GRPC_PORT=8500 \
    IMGSERVE_HTTP_PORT=8080
# Numeric, so Kubernetes' runAsNonRoot can verify it; nothing in the image is writable by it, and
# the gateway writes nothing outside /tmp, so a read-only root filesystem works.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8500 8080
# The gateway drains on SIGTERM (health NOT_SERVING, in-flight requests get IMGSERVE_SHUTDOWN_GRACE_S).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('IMGSERVE_HTTP_PORT', '8080') + '/healthz', timeout=2)"]
ENTRYPOINT ["/opt/imgserve/bin/imgserve"]
CMD ["serve"]
