"""Property-based requests generated from the gateway's own /openapi.json (schemathesis).

For every operation, a bounded number of generated requests — valid and invalid bodies,
query strings, path ids — sent with a real user's token: no answer is a 5xx, and every
answer's status code, content type and body match what the document promises.
"""
from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

schema = schemathesis.pytest.from_fixture("gateway_schema")


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_gateway_answers_match_its_openapi_document(case, user):
    case.call_and_validate(headers={"Authorization": f"Bearer {user.token}"}, checks=CHECKS)
