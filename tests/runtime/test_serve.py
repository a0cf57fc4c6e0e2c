"""How every function is served (infra/runtime/serve.py): gunicorn running the function's
own WSGI app, started as the supervisor and the image start it; what a function imports
before its first request; metrics aggregated across worker processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.mmap_dict import MmapedDict

from events import catalog, codec
from infra.runtime.config import load_config
from infra.runtime.launcher import free_ports, settings_env
from infra.runtime.process import function_command
from shared import delivery_auth

ROOT = Path(__file__).resolve().parents[2]
GRAPH = load_config()

# Loaded by a first request only when it needs them (or never by that function).
HEAVY = ("redis", "pybreaker", "flask", "functions_framework", "werkzeug", "jose", "argon2", "boto3", "jsonschema",
         "referencing")
FETCHES_AT_START = {"generate-pdf", "webhook-delivery"}  # their egress proxy / sender is their work


@pytest.mark.parametrize("name", [n for n, f in GRAPH.functions.items() if f.signature == "http" and n != "gateway"])
def test_a_broker_function_imports_nothing_heavy_before_its_first_request(name):
    module = f"functions.{GRAPH.functions[name].module_dir}.main"
    code = (f"import sys, json, {module} as m; assert callable(m.application); "
            f"print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in {list(HEAVY) + ['urllib3']!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    allowed = {m for m in loaded if m.split(".")[0] == "urllib3"} if name in FETCHES_AT_START else set()
    assert loaded <= allowed, f"{name} imports {sorted(loaded - allowed)} at start"


@pytest.fixture()
def serve(settings, tmp_path) -> Iterator:
    """Start function ``name`` exactly as the supervisor does, with ``workers`` processes."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, workers: int, threads: int = 2, metrics_dir: Path | None = None,
              extra_env: dict[str, str] | None = None) -> str:
        spec = GRAPH.functions[name]
        port = free_ports(1)[0]
        spec = type(spec)(**{**spec.__dict__, "port": port})
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKFORGE_", "PROMETHEUS_"))}
        env.update(settings_env(settings), PYTHONPATH=str(ROOT), WORKERS=str(workers), THREADS=str(threads))
        if metrics_dir is not None:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        env.update(extra_env or {})
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(function_command(spec, os.getpid()), cwd=ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        started.append(proc)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{spec.url}/healthz", timeout=1).status_code == 200:
                    return spec.url
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} did not start:\n{(tmp_path / f'{name}.log').read_text()}")
            time.sleep(0.05)

    yield start
    for proc in started:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=15)


def _signed(settings, event) -> tuple[dict[str, str], bytes]:
    headers, body = codec.to_binary_http(event)
    return delivery_auth.sign(settings, dict(headers), body), body


def test_the_served_worker_answers_cloudevents_as_before(serve, settings):
    url = serve("resize-image", workers=2)
    task_id = str(uuid.uuid4())
    event = codec.make_event({"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/taskforge/gateway",
                              "type": catalog.requested_type("resize-image"), "subject": task_id,
                              "datacontenttype": "application/json"},
                             {"task_id": task_id, "user_id": str(uuid.uuid4()), "type": "resize-image", "payload": {}})
    with httpx.Client(base_url=url, timeout=30) as client:
        headers, body = _signed(settings, event)
        binary = client.post("/", headers=headers, content=body)
        sheaders = {"content-type": codec.STRUCTURED_CT}
        sbody = json.dumps(codec.to_structured_doc(event)).encode()
        structured = client.post("/", headers=delivery_auth.sign(settings, sheaders, sbody), content=sbody)
        unsigned = client.post("/", headers=dict(codec.to_binary_http(event)[0]), content=body)
        garbage = client.post("/", headers=delivery_auth.sign(settings, {"content-type": "application/json"}, b"{}"),
                              content=b"{}")
        put = client.put("/", content=b"")
        health = client.get("/healthz")
    assert (binary.status_code, binary.json()) == (200, {"outcome": "missing"})
    assert (structured.status_code, structured.json()) == (200, {"outcome": "missing"})
    if settings.delivery_secret:
        assert unsigned.status_code == 401 and unsigned.json()["error"]["code"] == "unsigned_delivery"
    assert garbage.status_code == 400 and garbage.json()["error"]["code"]
    assert put.status_code == 405 and put.headers["allow"] == "GET, POST"
    assert health.json() == {"function": "resize-image", "status": "ok"}


def _dead_letter(settings) -> tuple[dict[str, str], bytes]:
    event = codec.make_event({"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/tests/serve",
                              "type": "com.taskforge.tests.probe", "datacontenttype": "application/json",
                              "knativeerrordest": "http://127.0.0.1:9/", "knativeerrorcode": "500"}, {"probe": True})
    return _signed(settings, event)


def _per_process(metrics_dir: Path, metric: str) -> dict[str, float]:
    """The counter's value in each worker's file (what the aggregation reads)."""
    out: dict[str, float] = {}
    for path in metrics_dir.glob("counter_*.db"):
        for key, value, *_rest in MmapedDict.read_all_values_from_file(str(path)):
            if json.loads(key)[1] == metric:  # [metric, sample name, labels...]
                out[path.name] = out.get(path.name, 0.0) + value
    return out


def test_metrics_aggregate_across_two_worker_processes(serve, settings, tmp_path):
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"stale")  # a previous server's file: removed on start
    url = serve("dead-letter", workers=2, threads=1, metrics_dir=metrics_dir)
    assert not (metrics_dir / "counter_1.db").exists()
    metric = "taskforge_dead_letters_total"

    def send(n: int) -> None:
        for _ in range(n):
            headers, body = _dead_letter(settings)
            r = httpx.post(f"{url}/", headers={**headers, "connection": "close"}, content=body, timeout=30)
            assert r.status_code == 200, r.text

    send(3)
    busy = [name for name, v in _per_process(metrics_dir, metric).items() if v]
    assert busy
    # Pause the process that took them: the next requests can only reach the other one.
    paused = int(busy[0].removeprefix("counter_").removesuffix(".db"))
    os.kill(paused, signal.SIGSTOP)
    try:
        send(4)
    finally:
        os.kill(paused, signal.SIGCONT)
    per_process = _per_process(metrics_dir, metric)
    assert len([v for v in per_process.values() if v]) == 2 and sum(per_process.values()) == 7, per_process
    for _ in range(4):  # whichever process answers the scrape, it reports both processes' counts
        page = httpx.get(f"{url}/metrics", headers={"connection": "close"}, timeout=30).text
        lines = [line for line in page.splitlines()
                 if line.startswith('taskforge_dead_letters_total{type="com.taskforge.tests.probe"}')]
        assert lines and float(lines[0].split()[-1]) == 7


def test_kept_alive_connections_are_served_back_to_back_without_starving_another(serve):
    """One thread (``THREADS=1``) and the lingering worker: a client pipelining request after
    request on one kept-alive connection gets every answer, a second client on its own
    connection is served meanwhile (the thread lingers only while nobody waits), and a
    request that comes long after the previous one is still served on the same connection."""
    import contextlib
    import re
    import socket
    import threading

    url = serve("dead-letter", workers=1, threads=1)
    stop = threading.Event()
    busy_answers: list[int] = []

    def busy() -> None:  # pipelines requests without waiting for answers: never quiet
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            def flood() -> None:
                with contextlib.suppress(OSError):
                    while not stop.is_set():
                        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 8)
            writer = threading.Thread(target=flood)
            writer.start()
            seen = b""
            while not stop.is_set():
                seen += sock.recv(65536)
            writer.join(15)
            busy_answers.extend(int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", seen))

    hog = threading.Thread(target=busy)
    hog.start()
    try:
        time.sleep(0.2)
        with httpx.Client(base_url=url, timeout=10) as other:
            others = [other.get("/healthz").status_code for _ in range(20)]
            time.sleep(0.3)  # far longer than the linger: back on the poller, still alive
            others.append(other.get("/healthz").status_code)
    finally:
        stop.set()
        hog.join(15)
    assert others == [200] * 21
    assert len(busy_answers) > 20 and set(busy_answers) == {200}


def test_an_idle_kept_alive_connection_stays_open_past_gunicorns_default(serve, settings):
    """gunicorn closes idle connections after 2 s by default; a function's server keeps
    them for ``settings.http_keepalive_s``, so a delivery after a quiet spell reuses its
    connection (the same socket answers, no reconnect)."""
    import http.client

    assert settings.http_keepalive_s > 5
    url = serve("dead-letter", workers=1, threads=1)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/healthz")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        time.sleep(3.0)  # past gunicorn's default keep-alive of 2 s
        conn.request("GET", "/healthz")
        second = conn.getresponse()
        second.read()
        assert (first.status, second.status) == (200, 200)
        assert conn.sock is sock  # answered on the connection kept open
    finally:
        conn.close()


@pytest.mark.parametrize("source", ["functions/gateway/main.py", "functions/dead_letter/main.py"])
def test_the_master_freezes_what_loading_the_function_made(source):
    """Loaded once in gunicorn's master, the function's objects are moved out of the
    collector's reach before the workers fork: a worker's full collection walks only what
    it made itself, and never writes to the pages it shares with the master."""
    code = ("import gc, json\n"
            "from infra.runtime import serve\n"
            f"args = serve.parse_args(['--source', {source!r}, '--target', 'handle'], {{}})\n"
            "serve.Server(args, None, owns_dir=False).load()\n"
            "print(json.dumps([gc.get_freeze_count(), len(gc.get_objects())]))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert proc.returncode == 0, proc.stderr
    frozen, tracked = json.loads(proc.stdout.strip().splitlines()[-1])
    assert frozen > 20_000  # the interpreter, the libraries and the function
    assert tracked < 100  # only what was made after the load


def test_a_function_whose_settings_are_refused_still_starts_and_says_so(serve):
    """The server reads its keep-alive from the settings; refused settings (production
    mode with RabbitMQ's guest account) must not stop a broker function from starting:
    it answers /healthz and names the refusal on /readyz, as in its container."""
    long_secret = "s" * 48
    url = serve("resize-image", workers=1, threads=1, extra_env={
        "TASKFORGE_ENV": "production", "TASKFORGE_JWT_SECRET": long_secret,
        "TASKFORGE_DELIVERY_SECRET": long_secret, "TASKFORGE_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/%2F"})
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    r = httpx.get(f"{url}/readyz", timeout=15)
    assert r.status_code == 503, r.text
    assert r.json()["checks"]["settings"] == "refused"
