"""``taskforge webhooks …`` and ``submit --callback-url`` against a real gateway."""
from __future__ import annotations

import json

import pytest
from standardwebhooks import Webhook

from shared import db
from shared.settings import Settings
from shared.tasks import state
from shared.worker import reply_event
from tests.cli.conftest import Stack, logged_in, stack  # noqa: F401  (fixtures)


@pytest.fixture()
def stack_settings(settings: Settings) -> Settings:
    # No broker (the test plays the worker); loopback receivers allowed.
    return settings.replace(eager_relay=False, fetch_allow_cidrs=("127.0.0.0/8",))


def test_webhook_commands(stack: Stack, logged_in: str, receiver, deliver):  # noqa: F811
    refused = stack.cli("webhooks", "add", "http://10.0.0.1/hook", "--json")
    assert refused.returncode == 2 and "private" in refused.stderr + refused.stdout

    added = stack.cli("webhooks", "add", receiver.url(), "--event", "task.succeeded", "--json")
    assert added.returncode == 0, added.stderr
    ep = json.loads(added.stdout)
    assert ep["events"] == ["task.succeeded"] and ep["secret"].startswith("whsec_")
    listed = json.loads(stack.cli("webhooks", "list", "--json").stdout)["items"]
    assert [e["id"] for e in listed] == [ep["id"]] and "secret" not in listed[0]

    rotated = stack.cli("webhooks", "rotate", ep["id"])
    assert rotated.returncode == 0 and "secret: whsec_" in rotated.stdout
    new_secret = rotated.stdout.split("secret: ", 1)[1].split()[0]

    no_signer = stack.cli("submit", "generate-pdf", "--html", "<p>x</p>", "--callback-url", receiver.url("/cb"))
    assert no_signer.returncode == 2 and "callback-secret" in no_signer.stderr + no_signer.stdout
    cb = json.loads(stack.cli("webhooks", "callback-secret", "--json").stdout)
    sub = stack.cli("submit", "generate-pdf", "--html", "<p>x</p>", "--callback-url", receiver.url("/cb"), "--json")
    assert sub.returncode == 0, sub.stderr
    task_id = json.loads(sub.stdout)["id"]

    with db.connection(stack.settings) as conn:  # the task finishes (the test plays the worker)
        conn.execute("UPDATE tasks SET status = 'running', lease_owner = 'w', lease_until = now() + interval '1 minute'"
                     " WHERE id = %s", (task_id,))
        row = state.succeed(conn, task_id, "w", {"key": "k", "content_type": "application/pdf", "size": 1})
    deliver(*reply_event("/taskforge/generate-pdf", row, None))
    by_path = {r.path: r for r in receiver.requests}
    assert set(by_path) == {"/hook", "/cb"}
    Webhook(new_secret).verify(by_path["/hook"].body, by_path["/hook"].headers)
    Webhook(ep["secret"]).verify(by_path["/hook"].body, by_path["/hook"].headers)  # grace period
    Webhook(cb["secret"]).verify(by_path["/cb"].body, by_path["/cb"].headers)

    out = stack.cli("webhooks", "deliveries", ep["id"])
    assert out.returncode == 0 and "task.succeeded  succeeded  attempts=1 [200]" in out.stdout
    (d,) = json.loads(stack.cli("webhooks", "deliveries", ep["id"], "--json").stdout)["items"]
    again = stack.cli("webhooks", "redeliver", ep["id"], d["id"], "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["status"] == "pending"

    assert stack.cli("webhooks", "rm", ep["id"]).returncode == 0
    assert stack.cli("webhooks", "rm", ep["id"]).returncode == 4
    assert [e["kind"] for e in json.loads(stack.cli("webhooks", "list", "--json").stdout)["items"]] == ["callback"]
