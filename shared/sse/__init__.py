"""The status stream's core: Server-Sent Events of task state, fanned out from Redis.

``wire`` (pure encoding/parsing, also used by the Python client), ``hub`` (the one Redis
reader per process), ``stream`` (one SSE response), ``store`` (async PostgreSQL reads),
``app`` (the HTTP surface used by ``functions/status_stream``).
"""
