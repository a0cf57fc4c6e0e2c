"""The library the TaskForge functions share (settings, database, auth, storage, ...)."""
