# One parameterised image definition for every TaskForge function (docs/architecture.md §7).
#
#   docker build --build-arg FUNCTION=resize-image --build-arg "PIP_EXTRAS=pillow boto3 urllib3" \
#                -t taskforge/resize-image .
#   docker build --build-arg FUNCTION=generate-pdf --build-arg "PIP_EXTRAS=pdfkit boto3 urllib3" \
#                --build-arg "APT_PACKAGES=wkhtmltopdf chromium fonts-dejavu-core fonts-liberation" \
#                -t taskforge/generate-pdf .
#   docker build --build-arg FUNCTION=status-stream --build-arg TARGET=status_stream --build-arg ASGI=true \
#                --build-arg "PIP_EXTRAS=uvloop httptools python-jose argon2-cffi" -t taskforge/status-stream .
#
# stack.yml carries each function's arguments (build_args), so `faas-cli build` and a
# plain `docker build` produce the same images; `make images` builds them all
# (infra/images/build.py). Behind a TLS-inspecting proxy or a private package index, pass
# the CA bundle and pip configuration as build secrets: they are mounted only while the
# install steps run and never stored in a layer (BuildKit: DOCKER_BUILDKIT=1 for docker):
#   podman build --secret id=ca-bundle,src=/path/ca.pem --secret id=pip-conf,src=pip.conf ...
# The gateway image also runs the migration Job (`taskforge migrate`) and the OpenFaaS
# bridge dispatcher.

# bookworm, not the floating tag: Debian 13 dropped wkhtmltopdf, which the PDF image needs.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# binutils, for stripping debug symbols from the extension modules pip installs. Only
# mounted into the install steps (read-only); no image carries it. Built once. TOOLS
# names what is mounted: this stage, or an image built from it (`make images` tags it
# and passes TOOLS: podman 4's buildah mounts a cached stage without its own layers).
FROM ${PYTHON_IMAGE} AS tools
RUN --mount=type=secret,id=ca-bundle \
    ca=""; [ -f /run/secrets/ca-bundle ] && ca="-o Acquire::https::CAInfo=/run/secrets/ca-bundle"; \
    apt-get update $ca \
    && apt-get install $ca -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*

# compress-video's ffmpeg: built from Debian's source package with only the codecs,
# containers and filters shared/media/video.py uses (infra/images/ffmpeg.sh); ~8 MB plus
# five codec libraries instead of a ~170 MB full build. Only an image whose FFMPEG
# argument names it (stack.yml) builds and copies it; `make images` builds it as an image
# of its own with podman, as it does the tools stage.
FROM ${PYTHON_IMAGE} AS ffmpeg
COPY infra/images/ffmpeg.sh /tmp/ffmpeg.sh
RUN --mount=type=secret,id=ca-bundle sh /tmp/ffmpeg.sh /opt/ffmpeg && rm /tmp/ffmpeg.sh

FROM ${PYTHON_IMAGE}

# No PYTHONDONTWRITEBYTECODE: pip byte-compiles what it installs and the project is
# compiled below, so a start (on a read-only root) reads .pyc instead of compiling.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /app

# Dependencies before code, so code changes do not reinstall them, and in this order so
# images share layers: (1) what every function imports, the same layer in every image;
# (2) this image's Debian packages; (3) the Python packages only this function imports.
# Each install is trimmed in its own step (infra/images/slim.py: only S3's botocore
# models, no tests folders of dependencies, extension modules stripped).
ARG TOOLS=tools
COPY requirements.txt infra/images/select-requirements.sh infra/images/slim.py /tmp/build/
RUN --mount=type=secret,id=ca-bundle --mount=type=secret,id=pip-conf \
    --mount=type=bind,from=${TOOLS},source=/,target=/tmp/tools \
    if [ -f /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi; \
    if [ -f /run/secrets/pip-conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip-conf; fi; \
    sh /tmp/build/select-requirements.sh /tmp/build/requirements.txt > /tmp/build/shared.txt \
    && pip install -r /tmp/build/shared.txt \
    && python /tmp/build/slim.py --tools /tmp/tools

# Debian packages only this image needs (the PDF renderers, compress-video's codec
# libraries; nothing for the others), without apt's lists, caches (~80 MB) or archives.
ARG APT_PACKAGES=""
RUN --mount=type=secret,id=ca-bundle \
    if [ -n "${APT_PACKAGES}" ]; then \
        ca=""; [ -f /run/secrets/ca-bundle ] && ca="-o Acquire::https::CAInfo=/run/secrets/ca-bundle"; \
        apt-get update $ca \
        && apt-get install $ca -y --no-install-recommends ${APT_PACKAGES} \
        && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/apt/archives/*.deb; \
    fi

# compress-video's ffmpeg (FFMPEG=ffmpeg, the stage above): onto PATH. Every other image
# mounts the tools stage, which has none, and copies nothing.
ARG FFMPEG=tools
RUN --mount=type=bind,from=${FFMPEG},source=/,target=/tmp/stage \
    if [ -x /tmp/stage/opt/ffmpeg/bin/ffmpeg ]; then install -m 0755 /tmp/stage/opt/ffmpeg/bin/ffmpeg /usr/local/bin/; fi

# Python packages only this function imports (the per-image part of requirements.txt).
ARG PIP_EXTRAS=""
RUN --mount=type=secret,id=ca-bundle --mount=type=secret,id=pip-conf \
    --mount=type=bind,from=${TOOLS},source=/,target=/tmp/tools \
    if [ -f /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi; \
    if [ -f /run/secrets/pip-conf ]; then export PIP_CONFIG_FILE=/run/secrets/pip-conf; fi; \
    if [ -n "${PIP_EXTRAS}" ]; then \
        sh /tmp/build/select-requirements.sh /tmp/build/requirements.txt ${PIP_EXTRAS} > /tmp/build/extras.txt \
        && pip install -r /tmp/build/extras.txt \
        && python /tmp/build/slim.py --tools /tmp/tools; \
    fi \
    && rm -rf /tmp/build

# Declared after the dependency layers, so they stay shared. FUNCTION: the function's
# name in infra/runtime/taskforge.yaml (its folder under functions/ has underscores for
# hyphens). TARGET: the
# functions-framework target. SIGNATURE: http or cloudevent; ASGI=true serves an async
# target (status-stream).
ARG FUNCTION
ARG TARGET=handle
ARG SIGNATURE=http
ARG ASGI=false
RUN test -n "${FUNCTION}" || { echo "build with --build-arg FUNCTION=<name>" >&2; exit 1; }

COPY shared ./shared
COPY events ./events
COPY functions ./functions
COPY taskforge ./taskforge
COPY infra/__init__.py ./infra/__init__.py
COPY infra/runtime ./infra/runtime
COPY infra/migrations ./infra/migrations
COPY infra/openfaas/*.py ./infra/openfaas/
COPY infra/images/entrypoint.sh /usr/local/bin/taskforge-function

# Byte-compiled at build time: the root filesystem is read-only at run time, and a cold
# start should not pay for compiling the project.
RUN python -m compileall -q -j 0 /app

# `taskforge migrate` (the migration Job) without installing the project a second time.
RUN printf '#!/bin/sh\nexec python -m taskforge.cli "$@"\n' > /usr/local/bin/taskforge \
    && chmod 0755 /usr/local/bin/taskforge /usr/local/bin/taskforge-function \
    && groupadd --system --gid 10001 taskforge \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/taskforge \
       --shell /usr/sbin/nologin taskforge

# The server (infra/runtime/serve.py, as functions-framework would) reads FUNCTION_TARGET,
# FUNCTION_SIGNATURE_TYPE, FUNCTION_USE_ASGI, PORT, WORKERS and THREADS (each Service sets
# its own WORKERS x THREADS); the platform may override PORT (Knative and OpenFaaS use 8080).
# The root filesystem may be read-only: /tmp is the only place written at run time
# (task work directories, gunicorn's heartbeat files and its control socket, found
# through XDG_RUNTIME_DIR).
ENV PYTHONPATH=/app \
    PORT=8080 \
    WORKERS=1 \
    THREADS=8 \
    FUNCTION_TARGET=${TARGET} \
    FUNCTION_SIGNATURE_TYPE=${SIGNATURE} \
    FUNCTION_USE_ASGI=${ASGI} \
    TASKFORGE_FUNCTION_NAME=${FUNCTION} \
    TASKFORGE_ENV=production \
    XDG_RUNTIME_DIR=/tmp

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/taskforge-function"]
