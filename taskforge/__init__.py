"""The TaskForge client: a Python SDK (``from taskforge import Client``) and the ``taskforge`` command."""
from taskforge.client import ApiError, Client, Event

__all__ = ["ApiError", "Client", "Event"]
