"""The template process (infra/runtime/template_process.py, its supervisor's side in
infra/runtime/template.py): functions forked from one pre-imported process answer real
requests with their own settings, and the supervisor starts, stops, scales to zero and
restarts them as it does plain processes; without a template they start the plain way."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from events import codec
from infra.runtime.config import PROJECT_ROOT, load_config, parse_config
from infra.runtime.launcher import alive, child_env, free_ports, settings_env
from infra.runtime.process import FunctionProcess, port_accepts
from infra.runtime.supervisor import Supervisor, function_env
from infra.runtime.template import Template, template_env
from shared.settings import Settings
from tests.runtime.conftest import Rig, event, graph_doc
from tests.runtime.conftest import child_env as plain_env
from tests.runtime.test_supervisor import wait_for


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def group_members(pgid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


@pytest.fixture()
def real_env(base_settings: Settings) -> dict[str, str]:
    """The environment the runtime gives the real graph's functions in this test session."""
    return child_env(base_settings)


@pytest.fixture()
def template(real_env: dict[str, str]) -> Iterator[Template]:
    graph = load_config()
    t = Template(template_env(function_env(graph, "dead-letter", real_env)), cwd=str(PROJECT_ROOT))
    t.start()
    assert t.wait_ready()
    yield t
    t.stop()


def dead_letter_event() -> tuple[str, dict[str, str], bytes]:
    attrs = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/tests/template",
             "type": "com.taskforge.tests.probe", "datacontenttype": "application/json",
             "knativeerrordest": "http://127.0.0.1:9/", "knativeerrorcode": "500"}
    headers, body = codec.to_binary_http(codec.make_event(attrs, {"probe": True}))
    return attrs["id"], dict(headers), body


def test_two_functions_from_one_template_answer_a_cloudevent_with_their_own_settings(
        template: Template, real_env: dict[str, str], base_settings: Settings, settings: Settings) -> None:
    graph = load_config()
    procs = {}
    for name, auth in (("signed", {"TASKFORGE_DELIVERY_AUTH": "signature", "TASKFORGE_DELIVERY_SECRET": "s" * 40}),
                       ("open", {"TASKFORGE_DELIVERY_AUTH": "none"})):
        spec = dataclasses.replace(graph.function("dead-letter"), port=free_ports(1)[0])
        env = {**function_env(graph, "dead-letter", real_env), "PORT": str(spec.port), **auth}
        procs[name] = FunctionProcess(spec, env, cwd=str(PROJECT_ROOT), template=template)
    try:
        for p in procs.values():
            p.ensure_running(30)
            assert p.from_template
            assert ppid(p.pid) == template.pid  # forked by the template, not started by us
            assert os.getpgid(p.pid) == p.pid  # its own session, as a plain start
        signed_id, headers, body = dead_letter_event()
        r = httpx.post(procs["signed"].spec.url, headers=headers, content=body, timeout=10)
        assert r.status_code == 401 and "unsigned_delivery" in r.text  # its settings ask for a signature
        open_id, headers, body = dead_letter_event()
        r = httpx.post(procs["open"].spec.url, headers=headers, content=body, timeout=10)
        assert r.status_code == 200, r.text
        with psycopg.connect(base_settings.database_url) as conn:
            ids = {row[0] for row in conn.execute("SELECT event_id FROM dead_letters")}
        assert open_id in ids and signed_id not in ids  # recorded in PostgreSQL by the open one only
        for name in ("signed", "open"):
            assert httpx.get(f"{procs[name].spec.url}/healthz", timeout=5).json()["function"] == "dead-letter"
    finally:
        for p in procs.values():
            p.stop(grace_s=5)
    assert template.spawned == 2


def test_supervisor_forks_from_the_template_scales_to_zero_restarts_and_stops(rig: Rig, tmp_path: Path) -> None:
    doc = graph_doc(free_ports(3), tmp_path)
    doc["functions"]["scripted"].update(idle_s=0.5, workers=2)
    doc["functions"]["dead-letter"]["min_scale"] = 1
    config = parse_config(doc)
    sup = Supervisor(config, plain_env(), template=True)
    assert sup.template is not None
    try:
        sup.start()
        template_pid = sup.template.pid
        recorder = sup.process("dead-letter")
        assert recorder.is_running() and recorder.from_template and ppid(recorder.pid) == template_pid
        proc = sup.process("scripted")
        assert not proc.is_running()
        # a CloudEvent delivery cold-starts the scripted function from the template
        e = event("test.codes", {})
        rig.publish(e)
        d = rig.dispatcher("codes", url=config.subscriber_url(config.triggers["codes"]),
                           activate=lambda: proc.serving())
        assert d.drain()["delivered"] == 1
        assert proc.from_template and proc.starts == 1
        calls = [json.loads(x) for x in (tmp_path / "scripted.jsonl").read_text().splitlines()]
        assert [c["headers"]["ce-id"] for c in calls] == [e["id"]]  # its own SCRIPTED_LOG, read at import
        # the recorder (same template, SCRIPTED_MODE=record, its own log) answers 200 to what the scripted one fails
        r = httpx.post(recorder.spec.url, json={"codes": [500]}, headers={"ce-id": "x"}, timeout=5)
        assert r.status_code == 200
        assert json.loads((tmp_path / "dead-letter.jsonl").read_text())["headers"]["ce-id"] == "x"
        # scale to zero: the whole group goes
        pid = proc.pid
        assert pid is not None
        wait_for(lambda: len(group_members(pid)) == 3, what="gunicorn master and 2 workers")
        wait_for(lambda: proc.state == "stopped", what="scale to zero")
        assert not port_accepts(proc.spec.port) and group_members(pid) == []
        # a crash of the always-on recorder: noticed, restarted from the template
        first = recorder.pid
        assert first is not None
        os.killpg(first, signal.SIGKILL)
        wait_for(lambda: recorder.crashes == 1, what="crash noticed")
        wait_for(lambda: recorder.is_running() and recorder.pid != first, what="restart")
        assert recorder.from_template and recorder.starts == 2
    finally:
        sup.stop(grace_s=3)
    assert not recorder.is_running() and not port_accepts(recorder.spec.port)
    assert not alive(template_pid)


def test_stop_sends_sigterm_and_kills_the_group(tmp_path: Path, template: Template) -> None:
    doc = graph_doc(free_ports(3), tmp_path)
    doc["functions"]["scripted"]["workers"] = 2
    config = parse_config(doc)
    env = function_env(config, "scripted", plain_env())
    proc = FunctionProcess(config.function("scripted"), env, cwd=str(PROJECT_ROOT), template=template)
    proc.ensure_running(30)
    assert proc.from_template
    pid = proc.pid
    assert pid is not None
    wait_for(lambda: len(group_members(pid)) == 3, what="gunicorn master and 2 workers")
    child = proc._proc
    proc.stop(grace_s=5)
    assert child is not None and child.returncode == 0  # gunicorn's orderly exit on SIGTERM
    assert group_members(pid) == [] and not port_accepts(proc.spec.port)


def test_without_a_template_functions_start_the_plain_way_until_a_new_one_starts(tmp_path: Path) -> None:
    doc = graph_doc(free_ports(3), tmp_path)
    doc["functions"]["scripted"]["min_scale"] = 1
    config = parse_config(doc)
    sup = Supervisor(config, plain_env(), template=True)
    assert sup.template is not None
    try:
        sup.start()
        proc = sup.process("scripted")
        assert proc.is_running() and proc.from_template
        first = proc.pid
        assert first is not None
        os.kill(sup.template.pid or 0, signal.SIGKILL)
        # its functions get SIGTERM with it; the supervisor restarts them the plain way
        wait_for(lambda: proc.crashes == 1, what="crash noticed")
        wait_for(lambda: proc.is_running() and proc.pid != first, what="plain restart")
        assert not proc.from_template and ppid(proc.pid) == os.getpid()
        assert httpx.post(proc.spec.url, json={}, headers={"ce-id": "y"}, timeout=5).status_code == 200
        assert not sup.template.alive
        # once it is time, a start brings a new template up and forks from it again
        sup.template.restart_after_s = 0.0
        second = proc.pid
        assert second is not None
        os.killpg(second, signal.SIGKILL)
        wait_for(lambda: proc.is_running() and proc.pid != second, what="restart from a new template")
        assert proc.from_template and sup.template.restarts == 1 and sup.template.alive
        assert ppid(proc.pid) == sup.template.pid
    finally:
        sup.stop(grace_s=3)
    assert not port_accepts(proc.spec.port)


def test_a_function_with_other_interpreter_variables_starts_the_plain_way(tmp_path: Path,
                                                                         template: Template) -> None:
    config = parse_config(graph_doc(free_ports(3), tmp_path))
    env = {**function_env(config, "scripted", plain_env()), "PYTHONHASHSEED": "7"}
    proc = FunctionProcess(config.function("scripted"), env, cwd=str(PROJECT_ROOT), template=template)
    try:
        proc.ensure_running(30)
        assert not proc.from_template and ppid(proc.pid) == os.getpid()
    finally:
        proc.stop(grace_s=3)
    assert template.spawned == 0


def test_after_the_code_changed_functions_start_the_plain_way_on_the_new_code(tmp_path: Path,
                                                                             template: Template) -> None:
    """A source file the template imported changes while the stack runs (a developer's
    edit): a later start must not fork old modules under new ones, so it goes plain."""
    config = parse_config(graph_doc(free_ports(3), tmp_path))
    env = function_env(config, "scripted", plain_env())
    first = FunctionProcess(config.function("scripted"), env, cwd=str(PROJECT_ROOT), template=template)
    second = FunctionProcess(config.function("scripted"), env, cwd=str(PROJECT_ROOT), template=template)
    edited = PROJECT_ROOT / "shared" / "pagination.py"  # imported by the template
    before = edited.stat()
    try:
        first.ensure_running(30)
        assert first.from_template and template.stale is None
        os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))  # "edited"
        second.spec = dataclasses.replace(second.spec, port=free_ports(1)[0])
        second.ensure_running(30)
        assert not second.from_template and ppid(second.pid) == os.getpid()
        assert template.stale == "shared/pagination.py" and template.alive
        assert first.is_running()  # what the template forked earlier keeps running
        assert httpx.post(second.spec.url, json={}, headers={"ce-id": "z"}, timeout=5).status_code == 200
    finally:
        os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
        first.stop(grace_s=3)
        second.stop(grace_s=3)
    assert template.spawned == 1


def test_the_template_imports_nothing_that_reads_the_environment() -> None:
    code = ("from infra.runtime.template_process import preload, check_clean; import sys; s = preload();"
            "print(check_clean(), s, 'psycopg' in sys.modules, 'gunicorn.arbiter' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=60, check=True, env=plain_env()).stdout.strip()
    assert out == "[] [] True True"
    dirty = subprocess.run([sys.executable, "-c", "import prometheus_client, threading; threading.Thread("
                            "target=threading.Event().wait, daemon=True).start();"
                            " from infra.runtime.template_process import check_clean; print(check_clean())"],
                           cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60, check=True,
                           env=plain_env()).stdout
    assert "prometheus_client imported" in dirty and "2 threads" in dirty


def test_template_env_carries_no_settings(base_settings: Settings) -> None:
    env = template_env(function_env(load_config(), "gateway", {**plain_env(), **settings_env(base_settings)}))
    assert not [k for k in env if k.startswith("TASKFORGE_")]
    assert "PORT" not in env and "K_SERVICE" not in env and env["PYTHONUNBUFFERED"] == "1"
    assert str(PROJECT_ROOT) in env["PYTHONPATH"]


def test_the_setting_turns_the_template_off(base_settings: Settings, tmp_path: Path) -> None:
    from infra.runtime.supervisor import Stack

    config = parse_config(graph_doc(free_ports(3), tmp_path))
    assert Stack(config, base_settings, plain_env()).supervisor.template is not None  # the default
    off = Stack(config, base_settings.replace(runtime_template=False), plain_env())
    assert off.supervisor.template is None
    assert all(p.template is None for p in off.supervisor.processes.values())
