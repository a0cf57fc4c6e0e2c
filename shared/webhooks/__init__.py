"""Completion webhooks: signed (Standard Webhooks 1.0), retried, dead-lettered callbacks.

- ``secrets``: signing secrets (``whsec_…``) and their encryption at rest;
- ``signing``: the Standard Webhooks headers of one message (pure);
- ``policy``: which answers are retried and when (pure);
- ``store``: endpoints, messages, attempts and dead letters in PostgreSQL;
- ``sender``: one HTTP attempt through the SSRF guard (pinned address, no redirects);
- ``delivery``: fan a completion event out to messages, attempt them, run due retries.
"""
