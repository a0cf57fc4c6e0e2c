#!/bin/sh
# Start one TaskForge function as the container's PID 1 (exec, so SIGTERM from Knative
# or OpenFaaS reaches gunicorn directly): infra/runtime/serve.py takes functions-framework's
# arguments and variables and serves the function's own WSGI app with gunicorn (ASGI
# functions through functions-framework), docs/architecture.md §6.
# The function's source follows from its name: functions/<name with _ for ->/main.py.
set -eu
name=${TASKFORGE_FUNCTION_NAME:?TASKFORGE_FUNCTION_NAME names the function to run}
dir=$(printf '%s' "$name" | tr '-' '_')
export FUNCTION_SOURCE="${FUNCTION_SOURCE:-/app/functions/$dir/main.py}"
if [ ! -f "$FUNCTION_SOURCE" ]; then
    echo "taskforge-function: no function source at $FUNCTION_SOURCE" >&2
    exit 1
fi
exec python -m infra.runtime.serve "$@"
