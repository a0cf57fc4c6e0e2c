"""Hostile-input fixtures: the gateway app and users of the gateway tests, reused, and
the gateway's OpenAPI document loaded for schemathesis."""
import pytest
import schemathesis
from flask import Flask

from tests.gateway.conftest import _fresh_clients, app, client, gw_settings, make_app, make_user, user  # noqa: F401


@pytest.fixture()
def gateway_schema(app: Flask):  # noqa: F811 - the imported fixture, requested by name
    return schemathesis.openapi.from_wsgi("/openapi.json", app)
