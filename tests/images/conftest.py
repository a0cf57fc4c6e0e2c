"""Fixtures of the image tests: the container engine (a missing engine or image fails,
never skips: build them with ``make images``) and users/tasks in the session database."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from infra.images.engine import Engine, EngineError, image_refs, require
from tests.worker.conftest import make_task, make_user  # noqa: F401 - fixtures reused here


@pytest.fixture(scope="session")
def engine() -> Engine:
    try:
        return require()
    except EngineError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def built(engine: Engine) -> Iterator[dict[str, str]]:
    """Function name -> image reference; fails when an image has not been built."""
    refs = image_refs()
    yield refs


def need_image(engine: Engine, ref: str) -> None:
    if not engine.image_exists(ref):
        pytest.fail(f"image {ref} is not built: run `make images`", pytrace=False)
