"""Fixtures of the image tests: the container engine (a missing engine or image fails,
never skips: build them with ``make images``) and users/tasks in the session database."""
from __future__ import annotations

import pytest

from infra.images.engine import Engine, EngineError, require
from tests.worker.conftest import make_task, make_user  # noqa: F401 - fixtures reused here


@pytest.fixture(scope="session")
def engine() -> Engine:
    try:
        return require()
    except EngineError as exc:
        pytest.fail(str(exc), pytrace=False)


def need_image(engine: Engine, ref: str) -> None:
    if not engine.image_exists(ref):
        pytest.fail(f"image {ref} is not built: run `make images`", pytrace=False)
