"""Batch jobs: manifest parsing, the repository (accept, progress, items, report, cancel,
retry) and the fair release of batch items to the outbox (docs/batches.md)."""
