"""The local runtime in container mode (``TASKFORGE_RUNTIME=containers make dev``): the
supervisor starts functions as containers of their images, the dispatcher delivers real
CloudEvents to them, tasks succeed end to end, and an idle container is scaled to zero
and cold-started again by the next delivery.

CI runs the worker images it builds (resize-image, generate-pdf) as containers and the
rest as processes; ``make images-test`` (TASKFORGE_IMAGES_ALL=1) runs every function
as a container."""
from __future__ import annotations

import http.server
import io
import threading
import time
from collections.abc import Iterator

import httpx
import psycopg
import psycopg.conninfo
import psycopg.sql
import pytest
import yaml
from PIL import Image

from infra.images.engine import Engine, image_refs
from infra.runtime.config import DEFAULT_PATH
from infra.runtime.containers import container_name
from infra.runtime.launcher import LocalStack, StackError
from shared import db
from shared.settings import Settings
from tests.images import harness
from tests.images.conftest import need_image

pytestmark = pytest.mark.e2e
START_TIMEOUT_S = 120.0
IDLE_S = 4  # resize-image's scale-to-zero delay in this stack (taskforge.yaml: 120 s)


class Picture(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def picture_url() -> Iterator[str]:
    buf = io.BytesIO()
    Image.new("RGB", (800, 600), "orange").save(buf, "PNG")
    Picture.body = buf.getvalue()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Picture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/photo.png"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def container_stack(base_settings: Settings, engine: Engine,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, list[str]]]:
    """A whole local stack (its own database, Redis prefix, broker name and storage) whose
    tested functions run as containers; resize-image scales to zero after IDLE_S."""
    in_containers = harness.tested_functions()
    for name in in_containers:
        need_image(engine, image_refs()[name])
    base_name = str(psycopg.conninfo.conninfo_to_dict(base_settings.database_url)["dbname"])
    url = psycopg.conninfo.make_conninfo(base_settings.database_url, dbname=base_name + "_ctr")
    db.ensure_database(url)
    db.migrate(url)
    settings = base_settings.replace(
        database_url=url, redis_prefix=base_settings.redis_prefix + ":ctr",
        broker_name=base_settings.broker_name + "-ctr", fetch_allow_cidrs=("127.0.0.0/8",),
        storage_dir=str(tmp_path_factory.mktemp("ctr-storage")))
    workdir = tmp_path_factory.mktemp("ctr-stack")
    raw = yaml.safe_load(DEFAULT_PATH.read_text(encoding="utf-8"))
    raw["functions"]["resize-image"]["idle_s"] = IDLE_S
    graph = workdir / "graph.yaml"
    graph.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    stack = LocalStack(settings, workdir, graph=graph, extra_env={
        "TASKFORGE_RUNTIME": "containers", "TASKFORGE_RUNTIME_CONTAINERS": ",".join(in_containers),
        "TASKFORGE_CONTAINER_ENGINE": engine.name})
    try:
        try:
            stack.start(START_TIMEOUT_S)
        except StackError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield stack, in_containers
    finally:
        stack.stop()
        db.close_pools()
        admin = psycopg.conninfo.make_conninfo(url, dbname="postgres")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg.sql.Identifier(base_name + "_ctr")))


def _container_of(engine: Engine, stack: LocalStack, function: str) -> str:
    return container_name(stack.settings, stack.config.function(function))


def _running(engine: Engine, name: str) -> bool:
    out = engine.run(["ps", "--filter", f"name=^{name}$", "--format", "{{.Names}}"], timeout_s=30).stdout
    return name in out.split()


def _wait(predicate, timeout_s: float, what: str, stack: LocalStack) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}\n{stack.log_tail()}")


def _finished(http: httpx.Client, task_id: str, stack: LocalStack) -> dict:
    seen: dict = {}

    def done() -> bool:
        seen.update(http.get(f"/tasks/{task_id}").json())
        return seen.get("status") in ("succeeded", "failed", "cancelled")

    _wait(done, 120, f"task {task_id} to finish", stack)
    return seen


def test_tasks_run_in_function_containers_end_to_end(container_stack, engine: Engine, picture_url: str):
    stack, in_containers = container_stack
    with httpx.Client(base_url=stack.gateway, timeout=30) as http:
        assert http.post("/auth/signup", json={"email": "ctr@example.com", "password": "correct horse"}).status_code == 201
        token = http.post("/auth/login", json={"email": "ctr@example.com",
                                                "password": "correct horse"}).json()["access_token"]
        http.headers["Authorization"] = f"Bearer {token}"

        # resize-image is scale-to-zero: the dispatcher's delivery cold-starts its container.
        resize = _container_of(engine, stack, "resize-image")
        assert not _running(engine, resize)
        r = http.post("/tasks", json={"type": "resize-image",
                                      "payload": {"source": {"url": picture_url}, "width": 200, "format": "webp"}})
        assert r.status_code == 202, r.text
        task = _finished(http, r.json()["id"], stack)
        assert task["status"] == "succeeded", task
        assert (task["result"]["width"], task["result"]["height"]) == (200, 150)
        out = http.get(f"/tasks/{task['id']}/result", follow_redirects=True)
        assert out.status_code == 200
        assert Image.open(io.BytesIO(out.content)).size == (200, 150)
        assert _running(engine, resize), "the task ran in the resize-image container"

        # Idle for IDLE_S: scaled to zero (the container is gone), then cold-started again.
        _wait(lambda: not _running(engine, resize), IDLE_S + 30, "resize-image scaled to zero", stack)
        r = http.post("/tasks", json={"type": "resize-image",
                                      "payload": {"source": {"url": picture_url}, "width": 64}})
        assert _finished(http, r.json()["id"], stack)["status"] == "succeeded"

        if "generate-pdf" in in_containers:
            r = http.post("/tasks", json={"type": "generate-pdf", "payload": {"html": "<h1>From a container</h1>"}})
            task = _finished(http, r.json()["id"], stack)
            assert task["status"] == "succeeded", task
            pdf = http.get(f"/tasks/{task['id']}/result", follow_redirects=True)
            assert pdf.content.startswith(b"%PDF")
            assert _running(engine, _container_of(engine, stack, "generate-pdf"))
