"""The transactional outbox: writer, publish core, eager relay and sweep."""
