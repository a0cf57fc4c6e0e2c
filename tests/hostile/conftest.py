"""Hostile-input fixtures: the gateway app and users of the gateway tests, reused, and
the gateway's OpenAPI document loaded for schemathesis."""
import socket

import pytest
import schemathesis
from flask import Flask

from tests.gateway.conftest import _fresh_clients, app, client, gw_settings, make_app, make_user, user  # noqa: F401


def _no_dns(host: str, port: int) -> list[str]:
    """Generated webhook URLs must never cause a real DNS lookup: every name is unknown."""
    raise socket.gaierror(socket.EAI_NONAME, "unknown host (tests resolve nothing)")


@pytest.fixture()
def gateway_schema(app: Flask):  # noqa: F811 - the imported fixture, requested by name
    app.config["TASKFORGE_RESOLVER"] = _no_dns
    return schemathesis.openapi.from_wsgi("/openapi.json", app)
