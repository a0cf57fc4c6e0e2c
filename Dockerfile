# One parameterised image definition for every TaskForge function (docs/architecture.md §7).
#
#   docker build --build-arg FUNCTION=resize-image -t taskforge/resize-image .
#   docker build --build-arg FUNCTION=compress-video --build-arg PIP_EXTRAS=imageio-ffmpeg \
#                -t taskforge/compress-video .
#   docker build --build-arg FUNCTION=generate-pdf --build-arg PIP_EXTRAS=pdfkit \
#                --build-arg "APT_PACKAGES=wkhtmltopdf chromium fonts-dejavu-core fonts-liberation" \
#                -t taskforge/generate-pdf .
#   docker build --build-arg FUNCTION=status-stream --build-arg TARGET=status_stream \
#                --build-arg ASGI=true -t taskforge/status-stream .
#
# stack.yml carries the same arguments per function (build_args), so `faas-cli build`
# and a plain `docker build` produce the same images. The gateway image also runs the
# migration Job (`taskforge migrate`) and the OpenFaaS bridge dispatcher.

# bookworm, not the floating tag: Debian 13 dropped wkhtmltopdf, which the PDF image needs.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

# FUNCTION: the function's name in infra/runtime/taskforge.yaml (its folder under
# functions/ has underscores for hyphens). TARGET: the functions-framework target.
ARG FUNCTION
ARG TARGET=handle
# SIGNATURE: http or cloudevent; ASGI=true serves an async target (status-stream).
ARG SIGNATURE=http
ARG ASGI=false
# Debian packages only this image needs (the PDF renderers; nothing for the others).
ARG APT_PACKAGES=""
# Media-only Python packages (listed in requirements.txt) this image adds back.
ARG PIP_EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN test -n "${FUNCTION}" || { echo "build with --build-arg FUNCTION=<name>" >&2; exit 1; }

RUN if [ -n "${APT_PACKAGES}" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends ${APT_PACKAGES} \
        && rm -rf /var/lib/apt/lists/*; \
    fi

WORKDIR /app

# Dependencies first, so code changes do not reinstall them.
COPY requirements.txt infra/images/select-requirements.sh /tmp/build/
RUN sh /tmp/build/select-requirements.sh /tmp/build/requirements.txt ${PIP_EXTRAS} > /tmp/build/image.txt \
    && pip install -r /tmp/build/image.txt \
    && rm -rf /tmp/build

COPY shared ./shared
COPY events ./events
COPY functions ./functions
COPY infra/__init__.py ./infra/__init__.py
COPY infra/runtime ./infra/runtime
COPY infra/migrations ./infra/migrations
COPY infra/openfaas/*.py ./infra/openfaas/
COPY infra/images/entrypoint.sh /usr/local/bin/taskforge-function

# `taskforge migrate` (the migration Job) without installing the project a second time.
RUN printf '#!/bin/sh\nexec python -m taskforge.cli "$@"\n' > /usr/local/bin/taskforge \
    && chmod 0755 /usr/local/bin/taskforge /usr/local/bin/taskforge-function \
    && groupadd --system --gid 10001 taskforge \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/taskforge \
       --shell /usr/sbin/nologin taskforge

# functions-framework reads FUNCTION_TARGET, FUNCTION_SIGNATURE_TYPE, FUNCTION_USE_ASGI,
# PORT, WORKERS and THREADS; the platform may override PORT (Knative and OpenFaaS use 8080).
ENV PYTHONPATH=/app \
    PORT=8080 \
    WORKERS=1 \
    THREADS=8 \
    FUNCTION_TARGET=${TARGET} \
    FUNCTION_SIGNATURE_TYPE=${SIGNATURE} \
    FUNCTION_USE_ASGI=${ASGI} \
    TASKFORGE_FUNCTION_NAME=${FUNCTION} \
    TASKFORGE_ENV=production

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/taskforge-function"]
