"""Chaos: tasks keep flowing through the local stack while its parts are broken on purpose.

While a few hundred tasks (mostly small resizes, some videos and PDFs, a few cancelled)
are submitted through the gateway, a seeded random schedule kills -9 each kind of
function process, kills -9 the runtime (its dispatchers, ingress and ticker; then it is
restarted), resets every RabbitMQ connection and refuses new ones for a few seconds (a
broker restart as the stack sees it), kills and restarts the stack's private Redis,
holds PostgreSQL unreachable for a few seconds and terminates the database's backends.

Afterwards, within a bound:
* every submission was eventually accepted (clients retry with their Idempotency-Key),
  and the database holds exactly the accepted tasks — none lost, none duplicated;
* every accepted task is terminal; failures carry a clear {code, message}; only tasks
  we asked to cancel are cancelled;
* no task has two result objects; a succeeded task has exactly its result object;
* the outbox has nothing pending and nothing parked;
* ``taskforge doctor``'s checks (``shared.doctor``) hold after every round of faults
  and at the end, with no grace: nothing stuck, lost, doubled or holding a secret.

``make test`` runs the short form (``--chaos=short``, the default); ``make chaos`` the
full one (``--chaos=full``: more tasks, three rounds of every fault).
"""
from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pika
import psycopg
import pytest
from psycopg.rows import dict_row

from events import codec
from events.amqp import to_amqp
from infra.runtime import topology
from infra.runtime.launcher import free_ports
from infra.runtime.process import RESTART_BACKOFF_MAX_S
from shared import db, doctor, storage
from shared.broker import dead_letter_queue
from shared.settings import Settings
from tests.conftest import PG_ADMIN
from tests.reliability.faults import PrivateRedis, TcpProxy, terminate_backends
from tests.reliability.stackctl import ChaosStack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TERMINAL = {"succeeded", "failed", "cancelled"}
FUNCTIONS = ("resize-image", "compress-video", "generate-pdf", "outbox-sweeper", "dead-letter", "gateway",
             "status-stream")


@dataclasses.dataclass(frozen=True)
class Scale:
    tasks: int
    rate_per_s: float
    rounds: int  # passes over the list of faults
    bound_s: float  # after the last fault: every task terminal and the outbox empty within this


SCALES = {"short": Scale(tasks=160, rate_per_s=4.0, rounds=1, bound_s=240),
          "full": Scale(tasks=600, rate_per_s=5.0, rounds=3, bound_s=600)}


# --- the stack under test ----------------------------------------------------------------
@dataclasses.dataclass
class Chaos:
    stack: ChaosStack
    pg: TcpProxy
    amqp: TcpProxy
    redis: PrivateRedis
    settings: Settings  # as the stack sees its services (through the proxies)
    direct_db: str  # the stack's database, bypassing the proxy (for assertions)
    database: str


@pytest.fixture()
def chaos(base_settings: Settings, tmp_path: Path) -> Iterator[Chaos]:
    name = f"{psycopg.conninfo.conninfo_to_dict(base_settings.database_url)['dbname']}_chaos"
    direct = psycopg.conninfo.make_conninfo(base_settings.database_url, dbname=name)
    db.ensure_database(direct)
    db.migrate(direct)
    redis = PrivateRedis(free_ports(1)[0]).start()
    pg = TcpProxy(5432).start()
    amqp = TcpProxy(5672).start()
    settings = base_settings.replace(
        database_url=psycopg.conninfo.make_conninfo(direct, host="127.0.0.1", port=str(pg.port)),
        amqp_url=f"amqp://guest:guest@127.0.0.1:{amqp.port}/%2F",
        redis_url=redis.url,
        broker_name=f"{base_settings.broker_name}-chaos",
        redis_prefix=f"{base_settings.redis_prefix}:chaos",
        storage_dir=str(tmp_path / "storage"),
        submit_rate_per_min=0, max_tasks_in_flight=0, login_rate_per_min=0, signup_rate_per_min=0,
        # A killed worker's lease runs out quickly, so its redelivery takes over soon.
        lease_s=10, claim_wait_s=20.0,
    )
    stack = ChaosStack(settings, tmp_path)
    try:
        stack.start()
        yield Chaos(stack, pg, amqp, redis, settings, direct, name)
    finally:
        stack.stop()
        amqp.close()
        pg.close()
        redis.kill()
        direct_settings = settings.replace(amqp_url=base_settings.amqp_url)
        try:
            topology.delete(direct_settings, stack.config)
        except Exception:  # noqa: BLE001 - cleanup of a throw-away broker name
            pass
        db.close_pools()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- inputs ------------------------------------------------------------------------------
def png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 40, 90)).save(buf, "PNG")
    return buf.getvalue()


def video(path: Path) -> bytes:
    import imageio_ffmpeg

    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=160x120:rate=15:duration=1", "-c:v", "libx264", "-preset", "ultrafast",
                    "-pix_fmt", "yuv420p", str(path)], check=True, timeout=60)
    return path.read_bytes()


class User:
    def __init__(self, gateway: str, tmp: Path) -> None:
        self.http = httpx.Client(base_url=gateway, timeout=15.0)
        email = f"chaos-{uuid.uuid4().hex[:8]}@example.com"
        assert self.http.post("/auth/signup", json={"email": email, "password": "chaos-password"}).status_code == 201
        tokens = self.http.post("/auth/login", json={"email": email, "password": "chaos-password"}).json()
        self.http.headers["Authorization"] = f"Bearer {tokens['access_token']}"
        self.id = self.http.get("/me").json()["id"]
        self.image = self._upload(png(), "image/png")
        self.video = self._upload(video(tmp / f"{self.id}.mp4"), "video/mp4")

    def _upload(self, data: bytes, content_type: str) -> str:
        r = self.http.post("/uploads", content=data, headers={"Content-Type": content_type})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def request(self, i: int) -> dict[str, Any]:
        if i % 10 == 3:
            return {"type": "compress-video", "payload": {"source": {"upload_id": self.video}, "crf": 40,
                                                          "preset": "ultrafast", "max_width": 80}}
        if i % 10 == 7:
            return {"type": "generate-pdf", "payload": {"html": f"<h1>chaos {i}</h1>", "margin_mm": 5}}
        return {"type": "resize-image", "payload": {"source": {"upload_id": self.image}, "width": 16 + i % 7}}


def _with_retries(fn: Callable[[], httpx.Response], ok: set[int], budget_s: float) -> httpx.Response | None:
    """Call until the answer's status is in ``ok`` (transport errors, 429, 5xx retried)."""
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        try:
            r = fn()
            if r.status_code in ok:
                return r
            if r.status_code < 500 and r.status_code != 429:
                raise AssertionError(f"unexpected answer {r.status_code}: {r.text[:300]}")
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return None


@dataclasses.dataclass
class Flow:
    accepted: dict[str, str] = dataclasses.field(default_factory=dict)  # task id -> user id
    unanswered: list[str] = dataclasses.field(default_factory=list)  # idempotency keys
    cancel_requested: set[str] = dataclasses.field(default_factory=set)
    retried_submissions: int = 0


def submit(users: list[User], scale: Scale, flow: Flow) -> None:
    t_next = time.monotonic()
    for i in range(scale.tasks):
        user = users[i % len(users)]
        body = user.request(i)
        key = uuid.uuid4().hex
        attempts = [0]

        def post(user: User = user, body: dict[str, Any] = body, key: str = key,
                 attempts: list[int] = attempts) -> httpx.Response:
            attempts[0] += 1
            return user.http.post("/tasks", json=body, headers={"Idempotency-Key": key})

        r = _with_retries(post, {200, 202}, budget_s=120)
        flow.retried_submissions += attempts[0] > 1
        if r is None:
            flow.unanswered.append(key)
            continue
        task_id = r.json()["id"]
        flow.accepted[task_id] = user.id
        if i % 15 == 11:  # a few cancels, racing the work
            if _with_retries(lambda u=user, t=task_id: u.http.post(f"/tasks/{t}/cancel"), {202, 409}, 60):
                flow.cancel_requested.add(task_id)
        t_next += 1.0 / scale.rate_per_s
        time.sleep(max(0.0, t_next - time.monotonic()))


def wake_dead_letter(c: Chaos, base_amqp_url: str) -> None:
    """Dead-letter an event that belongs to no task, so the dead-letter function is up
    (it scales to zero) and can be killed like the others."""
    attrs = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/chaos/probe", "type": "com.taskforge.chaos.probe",
             "datacontenttype": "application/json", "knativeerrordest": "http://127.0.0.1:9/",
             "knativeerrorcode": "500"}
    headers, props, body = to_amqp(codec.make_event(attrs, {"probe": True}))
    conn = pika.BlockingConnection(pika.URLParameters(base_amqp_url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", dead_letter_queue(c.settings), body, pika.BasicProperties(headers=headers, **props))
    finally:
        conn.close()
    deadline = time.monotonic() + 60
    while "dead-letter" not in c.stack.function_pids():
        assert time.monotonic() < deadline, "the dead-letter function never started"
        time.sleep(0.2)


def faults(c: Chaos, rng: random.Random) -> list[tuple[str, Callable[[], Any]]]:
    out: list[tuple[str, Callable[[], Any]]] = [
        (f"kill -9 {name}", lambda name=name: c.stack.kill_function(name)) for name in FUNCTIONS
    ]
    out += [
        ("kill -9 runtime (dispatchers, ingress, ticker) + restart", c.stack.kill_runtime),
        ("rabbitmq restart (connections reset, 3 s down)", lambda: c.amqp.outage(3.0)),
        ("redis restart (kill -9, 1 s down, empty)", lambda: c.redis.restart(1.0)),
        ("postgresql stop (connections reset, 3 s down)", lambda: c.pg.outage(3.0)),
        ("postgresql backends terminated", lambda: terminate_backends(PG_ADMIN, c.database)),
    ]
    rng.shuffle(out)
    return out


def chaos_seed(request: pytest.FixtureRequest) -> int:
    """The run's seed: ``--chaos-seed`` replays a failed run's schedule (its fault order,
    its pauses, its poisoned lines), otherwise a fresh one that the failure message names."""
    given = request.config.getoption("--chaos-seed")
    return random.randrange(1 << 30) if given is None else int(given)


def run_doctor(c: Chaos, grace_s: float = doctor.DEFAULT_GRACE_S) -> doctor.Report:
    """The doctor's report on the stack's database (directly, not through the proxy),
    storage and private Redis."""
    return doctor.run(c.settings.replace(database_url=c.direct_db), grace_s=grace_s)


def run_faults(c: Chaos, scale: Scale, rng: random.Random, log: list[str], done: threading.Event,
               reports: list[doctor.Report] | None = None) -> None:
    for _ in range(scale.rounds):
        if reports is not None and log:
            reports.append(run_doctor(c))  # after each round of faults
        for name, fault in faults(c, rng):
            time.sleep(rng.uniform(1.0, 4.0))
            result = fault()
            for _retry in range(5):  # a scaled-to-zero function: try again when it runs
                if result is not False:
                    break
                time.sleep(1.0)
                result = fault()
            log.append(f"{name}: {result}")
    if reports is not None:
        reports.append(run_doctor(c))
    done.set()


# --- checks ------------------------------------------------------------------------------
def wait_settled(c: Chaos, ids: list[str], bound_s: float) -> list[dict[str, Any]]:
    """Rows of ``ids`` once every one is terminal and the outbox has nothing pending."""
    deadline = time.monotonic() + bound_s
    while True:
        try:
            with psycopg.connect(c.direct_db, row_factory=dict_row, autocommit=True) as conn:
                rows = conn.execute("SELECT * FROM tasks WHERE id = ANY(%s::uuid[])", (ids,)).fetchall()
                pending = conn.execute("SELECT count(*) AS n FROM outbox WHERE dispatched_at IS NULL").fetchone()["n"]
        except psycopg.OperationalError:
            rows, pending = [], -1
        if rows and all(r["status"] in TERMINAL for r in rows) and len(rows) == len(ids) and pending == 0:
            return rows
        if time.monotonic() > deadline:
            stuck = Counter(r["status"] for r in rows if r["status"] not in TERMINAL)
            pytest.fail(f"not settled {bound_s:.0f}s after the last fault: {len(ids) - len(rows)} missing, "
                        f"not terminal {dict(stuck)}, outbox pending {pending}\n{c.stack.log_tail()}",
                        pytrace=False)
        time.sleep(1.0)


def wait_answers(c: Chaos, name: str, within_s: float) -> None:
    """Return once the function's ``/healthz`` answers 200; fail after ``within_s``."""
    url = f"{c.stack.config.function(name).url}/healthz"
    deadline = time.monotonic() + within_s
    while True:
        try:
            last = repr(httpx.get(url, timeout=5).status_code)
            if last == "200":
                return
        except httpx.HTTPError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            pytest.fail(f"{name} did not answer /healthz within {within_s:.0f}s (last: {last})\n"
                        f"{c.stack.log_tail()}", pytrace=False)
        time.sleep(0.2)


def test_no_task_is_lost_or_doubled_while_everything_breaks(chaos: Chaos, request: pytest.FixtureRequest,
                                                             tmp_path: Path, base_settings: Settings) -> None:
    scale = SCALES[request.config.getoption("--chaos")]
    seed = chaos_seed(request)
    rng = random.Random(seed)
    users = [User(chaos.stack.gateway, tmp_path) for _ in range(2)]
    wake_dead_letter(chaos, base_settings.amqp_url)
    flow, fault_log, faults_done = Flow(), list[str](), threading.Event()
    reports: list[doctor.Report] = []
    chaos_thread = threading.Thread(target=run_faults, args=(chaos, scale, rng, fault_log, faults_done, reports),
                                    daemon=True)
    started = time.monotonic()
    chaos_thread.start()
    submit(users, scale, flow)
    chaos_thread.join(timeout=scale.rounds * 200)
    assert faults_done.is_set(), f"the fault schedule did not finish: {fault_log}"
    chaos.stack.wait_ready(60)  # the last runtime restart (if any) is up

    assert not flow.unanswered, f"{len(flow.unanswered)} submissions never accepted (seed {seed})"
    ids = list(flow.accepted)
    rows = wait_settled(chaos, ids, scale.bound_s)
    by_id = {str(r["id"]): r for r in rows}

    # Exactly the accepted tasks exist: retried submissions made no duplicates.
    with psycopg.connect(chaos.direct_db, row_factory=dict_row) as conn:
        all_ids = {str(r["id"]) for r in conn.execute("SELECT id FROM tasks").fetchall()}
        parked = conn.execute("SELECT count(*) AS n FROM outbox WHERE parked_at IS NOT NULL").fetchone()["n"]
    assert all_ids == set(ids), f"tasks in the database that were never accepted: {all_ids - set(ids)}"
    assert parked == 0, f"{parked} outbox rows parked"

    store = storage.get_storage(chaos.settings)
    doubled, missing_result = [], []
    for task_id, row in by_id.items():
        objects = store.list(f"results/{row['user_id']}/{task_id}/")
        if len(objects) > 1:
            doubled.append((task_id, objects))
        if row["status"] == "succeeded" and objects != [row["result"]["key"]]:
            missing_result.append((task_id, objects, row["result"]))
        if row["status"] == "failed":
            assert row["error"] and row["error"].get("code") and row["error"].get("message"), row
        if row["status"] == "cancelled":
            assert task_id in flow.cancel_requested, f"cancelled without being asked: {row}"
    assert not doubled, f"tasks with two result objects: {doubled[:5]}"
    assert not missing_result, f"succeeded tasks without exactly their result object: {missing_result[:5]}"

    # The doctor found nothing after any round, nor at the end with no grace at all.
    assert len(reports) == scale.rounds
    for i, rep in enumerate(reports):
        assert rep.ok, f"doctor after round {i + 1}:\n{doctor.render(rep)}"
    final = run_doctor(chaos, grace_s=0)
    assert final.ok, f"doctor at the end:\n{doctor.render(final)}"
    assert all(c.ok for c in final.checks), doctor.render(final)  # no warning either (Redis capped)

    # The stack is whole again: every always-on function answers (one killed by the last
    # fault is back once the supervisor's restart backoff has run out).
    for name in ("gateway", "status-stream"):
        wait_answers(chaos, name, within_s=RESTART_BACKOFF_MAX_S + 30)

    statuses = Counter(r["status"] for r in rows)
    errors = Counter(r["error"]["code"] for r in rows if r["status"] == "failed")
    report = {"scale": request.config.getoption("--chaos"), "seed": seed, "accepted": len(ids),
              "statuses": dict(statuses), "failure_codes": dict(errors),
              "submissions_retried": flow.retried_submissions, "cancel_requested": len(flow.cancel_requested),
              "function_kills": chaos.stack.function_kills, "runtime_kills": chaos.stack.runtime_kills,
              "rabbitmq_outages": chaos.amqp.cuts, "postgres_outages": chaos.pg.cuts,
              "redis_restarts": chaos.redis.restarts, "attempts_total": sum(r["attempts"] for r in rows),
              "seconds": round(time.monotonic() - started, 1), "faults": fault_log}
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():  # the counts belong in the run's output
        print("\nchaos report: " + json.dumps(report, indent=1))
