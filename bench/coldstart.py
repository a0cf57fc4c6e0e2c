"""Cold start per function (issue 7): process start to the first event handled.

For each function of the graph: spawn its process exactly as the local supervisor does
(``infra.runtime.process.function_command``: ``infra.runtime.serve``, gunicorn around the
function's own WSGI app with the graph's workers and threads; functions-framework with
uvicorn workers for ASGI), then send its first real request until it is answered:

* worker functions (resize-image, compress-video, generate-pdf): a binary-mode
  ``*.requested`` event for a task that does not exist — decoded, validated, claimed in
  PostgreSQL (the pool connects), answered 200 "missing" without media work;
* outbox-sweeper: a ``com.taskforge.outbox.sweep`` tick (a sweep of the empty bench outbox);
* dead-letter: a dead-lettered event (recorded in the bench database);
* gateway and status-stream: ``GET /healthz``.

Two paths, both reported (issue 13: "report both the template path and the plain path"):

* the plain path, ``cold_start_ms_<function>``: a new interpreter from the venv
  (``python -m infra.runtime.child …``, what container mode and ``TASKFORGE_RUNTIME_TEMPLATE=false``
  do) — median over rounds of (first answer − spawn), ms;
* the template path, ``cold_start_ms_template_<function>``: what ``make dev``'s scale from
  zero does by default — the template process (``infra/runtime/template_process.py``) is
  already running with its imports done, and the figure is (first answer − the fork
  request), ms. The template's own start is paid once per stack and is in the details
  (``template_ready_ms``), not in the figure.

``cold_start_cpu_ms_<function>`` and ``cold_start_cpu_ms_template_<function>`` are the CPU
time (user + system) the function's processes spent in that span, ms, which a loaded
machine moves far less than the wall-clock figure (for the template path: only the forked
child's, the template's imports are shared, not spent again).

Baseline of all four: a bare functions-framework function that does nothing
(``bench/bare/main.py``, the ASGI variant for ASGI functions) started the plain way with
the same request and environment (so the same number of processes), alternating with the
function's plain and template starts in the same run. The template figures' details also
give the bare function forked from the template (``bare_from_template_ms``: the floor of
that path). The plain figure's details list the function's top imports (``top_imports``:
import time of ``functions.<name>.main`` by top-level package, ms, from ``python -X
importtime`` in a fresh process), the template figure's those left after the template's
(``top_imports_after_template``), so a regression shows what it loads.

Before any start the project (and the bare functions) is byte-compiled, as the images
are at build time and as any interpreter allowed to write its cache leaves it after its
first start: without it, in an environment that sets ``PYTHONDONTWRITEBYTECODE`` (some CI
machines do), every plain start would compile the project's modules from source again,
a cost no deployment pays (about 30 ms for a worker, 50 ms for the gateway here).

Figure ``cold_start_ms_container_<function>`` = median over rounds of (first answer −
``<engine> run``), ms: the function started as a container of its image exactly as the
runtime's container mode starts it (host networking, read-only root, settings files),
the same first request. Baseline: the same function as a local process (the figure
above), alternating. Functions whose image is not built (``make images``) or hosts
without a working container engine are reported as not measured.
"""
from __future__ import annotations

import compileall
import dataclasses
import functools
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from bench.harness import BenchContext, Figure, alternate, median
from events import catalog, codec
from infra.images.engine import Engine, detect, image_refs
from infra.runtime.config import FunctionSpec, load_config
from infra.runtime.launcher import free_ports, settings_env
from infra.runtime.process import Child, function_command, serve_args
from infra.runtime.supervisor import function_env
from infra.runtime.template import Template, template_env
from shared.settings import Settings

BARE = Path(__file__).resolve().parent / "bare" / "main.py"
PROJECT = BARE.parents[2]
PACKAGES = ("shared", "events", "functions", "infra", "taskforge")  # pyproject.toml's
FIRST_ANSWER_TIMEOUT_S = 60.0
WORKERS = {"resize-image", "compress-video", "generate-pdf"}


def first_request(function: str) -> tuple[str, str, dict[str, str], bytes]:
    """``(method, path, headers, body)`` of the first request sent to ``function``."""
    data: dict[str, Any]
    if function in WORKERS:
        task_type = function
        attrs = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/taskforge/gateway",
                 "type": catalog.requested_type(task_type), "subject": str(uuid.uuid4()),
                 "datacontenttype": "application/json"}
        data = {"task_id": attrs["subject"], "user_id": str(uuid.uuid4()), "type": task_type, "payload": {}}
    elif function == "outbox-sweeper":
        attrs = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/bench/ticker",
                 "type": catalog.OUTBOX_SWEEP, "datacontenttype": "application/json"}
        data = {}
    elif function == "dead-letter":
        attrs = {"specversion": "1.0", "id": str(uuid.uuid4()), "source": "/bench/cold-start",
                 "type": "com.taskforge.bench.probe", "datacontenttype": "application/json",
                 "knativeerrordest": "http://127.0.0.1:9/", "knativeerrorcode": "500"}
        data = {"probe": True}
    else:
        return "GET", "/healthz", {}, b""
    headers, body = codec.to_binary_http(codec.make_event(attrs, data))
    return "POST", "/", dict(headers), body


_MARK = "-- template imports done --"


def top_imports(module: str, n: int = 8, after_template: bool = False) -> dict[str, float]:
    """The ``n`` top-level packages that cost ``module``'s import the most (self time
    summed over their modules, ms; the project's packages by second-level name). With
    ``after_template``: only what is left to import after the template's modules."""
    code = f"import {module}"
    if after_template:
        code = f"import sys; from infra.runtime.template_process import preload; preload(); print({_MARK!r}, " \
               f"file=sys.stderr); {code}"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                          cwd=str(Path(__file__).resolve().parents[1]), capture_output=True, text=True,
                          timeout=120, check=False)
    lines = proc.stderr.splitlines()
    if after_template and _MARK in lines:
        lines = lines[lines.index(_MARK) + 1:]
    cost: dict[str, float] = {}
    for line in lines:
        if not line.startswith("import time:") or "|" not in line:
            continue
        fields = line[len("import time:"):].split("|")
        try:
            self_us = int(fields[0])
        except ValueError:  # the header line
            continue
        parts = fields[2].strip().split(".")
        key = ".".join(parts[:2]) if parts[0] in ("shared", "events", "functions") else parts[0]
        cost[key] = cost.get(key, 0.0) + self_us / 1000
    return {k: round(v, 1) for k, v in sorted(cost.items(), key=lambda kv: -kv[1])[:n]}


_TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def group_cpu_ms(pgid: int) -> float:
    """CPU time (user + system, ms) spent so far by every live process of group ``pgid``
    (a gunicorn master and its workers), from ``/proc``: a figure that the other load on
    the machine barely moves, unlike wall-clock time."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # fields[0] is the state; [2] the process group
            total += (int(fields[11]) + int(fields[12])) * _TICK_MS  # utime, stime
    return total


def time_first_answer(spec: FunctionSpec, env: dict[str, str], request: tuple[str, str, dict[str, str], bytes],
                      source: Path | None = None) -> float:
    """Spawn ``spec`` (or ``source`` in its place), return ms until a non-5xx answer."""
    return first_answer(spec, env, request, source)[0]


def first_answer(spec: FunctionSpec, env: dict[str, str], request: tuple[str, str, dict[str, str], bytes],
                 source: Path | None = None) -> tuple[float, float]:
    """Spawn ``spec`` (or ``source`` in its place): ``(wall ms until a non-5xx answer,
    CPU ms its processes spent until then)``."""
    if source is not None:
        spec = dataclasses.replace(spec, source=source, target="handle")
    cmd = function_command(spec, os.getpid())
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=str(Path(__file__).resolve().parents[1]),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        ms = _first_answer_ms(proc, t0, spec.url, request, f"{spec.name} ({spec.source})")
        return ms, group_cpu_ms(proc.pid)
    finally:
        _kill_group(proc)


def first_answer_template(template: Template, spec: FunctionSpec, env: dict[str, str],
                          request: tuple[str, str, dict[str, str], bytes],
                          source: Path | None = None) -> tuple[float, float]:
    """Fork ``spec`` (or ``source`` in its place) from the running ``template``, as the
    runtime's scale from zero does: ``(wall ms until a non-5xx answer, CPU ms the
    function's processes spent until then)``."""
    if source is not None:
        spec = dataclasses.replace(spec, source=source, target="handle")
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        t0 = time.perf_counter()
        child = template.spawn(spec.name, serve_args(spec), env, str(Path(__file__).resolve().parents[1]),
                               stdout=null, stderr=null)
    finally:
        os.close(null)
    if child is None:
        raise RuntimeError(f"the template could not start {spec.name}")
    try:
        ms = _first_answer_ms(child, t0, spec.url, request, f"{spec.name} ({spec.source}) from the template")
        return ms, group_cpu_ms(child.pid)
    finally:
        _kill_group(child)


def _kill_group(child: Child) -> None:
    """SIGKILL a measured function's whole process group and reap its leader."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait(timeout=10)


def _first_answer_ms(proc: Child, t0: float, url: str,
                     request: tuple[str, str, dict[str, str], bytes], what: str) -> float:
    """Send ``request`` to ``url`` until it is answered (connection refusals retried every
    5 ms); ms since ``t0`` of the first non-5xx answer. Raises if ``proc`` exits, the
    answer is a 5xx, or nothing answers within ``FIRST_ANSWER_TIMEOUT_S``."""
    method, path, headers, body = request
    with httpx.Client(timeout=10.0) as client:
        while True:
            if time.perf_counter() - t0 > FIRST_ANSWER_TIMEOUT_S or proc.poll() is not None:
                raise RuntimeError(f"{what} never answered (exit {proc.poll()})")
            try:
                r = client.request(method, f"{url}{path}", headers=headers, content=body)
            except httpx.TransportError:
                time.sleep(0.005)
                continue
            if r.status_code < 500:
                return (time.perf_counter() - t0) * 1000
            raise RuntimeError(f"{what} answered {r.status_code}: {r.text[:300]}")


def time_first_answer_container(launcher: Any, request: tuple[str, str, dict[str, str], bytes]) -> float:
    """Start ``launcher``'s container, return ms until its first non-5xx answer; removes it."""
    url = f"http://127.0.0.1:{launcher.spec.port}"
    launcher.prepare()
    t0 = time.perf_counter()
    proc = subprocess.Popen(launcher.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        return _first_answer_ms(proc, t0, url, request, f"{launcher.spec.name} container")
    finally:
        launcher.cleanup()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def container_figures(ctx: BenchContext, engine: Engine | None, rounds: int) -> list[Figure]:
    """``cold_start_ms_container_<function>`` for every function whose image is built."""
    import tempfile

    from infra.runtime.containers import ContainerLauncher, container_env, settings_files

    if engine is None:
        print("cold start: no working container engine, containers not measured", file=sys.stderr)
        return []
    s: Settings = ctx.settings
    graph = load_config()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_") and k not in ("K_SINK", "PORT")}
    base_env.update(settings_env(s))
    base_env["WORKERS"] = "1"
    refs = image_refs()
    figures = []
    with tempfile.TemporaryDirectory(prefix="taskforge-bench-") as tmp:
        files = settings_files(s, Path(tmp) / "secrets")
        storage = Path(tmp) / "storage"
        storage.mkdir()
        if os.geteuid() == 0:
            os.chown(storage, 10001, 10001)
        for name, spec in graph.functions.items():
            if not engine.image_exists(refs[name]):
                print(f"cold start: image {refs[name]} not built, container not measured", file=sys.stderr)
                continue
            spec = dataclasses.replace(spec, port=free_ports(1)[0])
            env = function_env(graph, name, base_env)
            env["PORT"] = str(spec.port)
            request = first_request(name)
            launcher = ContainerLauncher(engine=engine, spec=spec, image=refs[name],
                                         name=f"{s.broker_name}-bench-{name}",
                                         env=container_env(env, s, files, str(storage)),
                                         secrets_dir=Path(tmp) / "secrets", storage_dir=str(storage))
            value, base = alternate(functools.partial(time_first_answer_container, launcher, request),
                                    functools.partial(time_first_answer, spec, env, request), rounds)
            figures.append(Figure(f"cold_start_ms_container_{name.replace('-', '_')}", median(value), "ms",
                                  "the same function as a local process, same start and request", median(base),
                                  {"first_request": " ".join(request[:2]), "rounds": rounds, "engine": engine.name,
                                   "image": refs[name]}))
    return figures


def start_template(env: dict[str, str]) -> tuple[Template, float, float]:
    """The template process for ``env``'s functions, running: ``(template, ms until it
    was ready, its CPU ms)``."""
    template = Template(template_env(env), cwd=str(Path(__file__).resolve().parents[1]))
    t0 = time.perf_counter()
    template.start()
    if not template.wait_ready():
        raise RuntimeError("the template process did not start")
    assert template.pid is not None
    return template, (time.perf_counter() - t0) * 1000, group_cpu_ms(template.pid)


def byte_compile() -> None:
    """Byte-compile the project's packages and the bare functions (see the module docstring)."""
    for directory in (*(PROJECT / p for p in PACKAGES), BARE.parent):
        if not compileall.compile_dir(directory, quiet=1, workers=0):
            raise RuntimeError(f"cannot byte-compile {directory}")


def run(ctx: BenchContext) -> list[Figure]:
    s: Settings = ctx.settings
    byte_compile()
    graph = load_config()
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("TASKFORGE_") and k not in ("K_SINK", "PORT")}
    base_env.update(settings_env(s))
    base_env["WORKERS"] = "1"
    rounds = 7 if ctx.full else 3
    figures = []
    template, ready_ms, ready_cpu_ms = start_template(function_env(graph, next(iter(graph.functions)), base_env))
    try:
        for name, spec in graph.functions.items():
            if not Path(spec.source).is_file():  # a function not written yet: say so, measure the rest
                print(f"cold start: {name} has no {spec.source}, not measured", file=sys.stderr)
                continue
            figures += function_figures(ctx, template, graph, name, spec, base_env, rounds,
                                        {"template_ready_ms": round(ready_ms, 1),
                                         "template_ready_cpu_ms": round(ready_cpu_ms, 1)})
    finally:
        template.stop()
    return figures + container_figures(ctx, detect(s.container_engine), rounds)


def function_figures(ctx: BenchContext, template: Template, graph: Any, name: str, spec: FunctionSpec,
                     base_env: dict[str, str], rounds: int, template_details: dict[str, Any]) -> list[Figure]:
    """The plain and template figures of one function (wall and CPU), one alternation."""
    env = function_env(graph, name, base_env)
    request = first_request(name)
    spec = dataclasses.replace(spec, port=free_ports(1)[0])
    env["PORT"] = str(spec.port)
    bare = BARE.with_name("asgi.py") if spec.signature == "asgi" else BARE
    plain, base, forked, bare_forked = alternate(
        functools.partial(first_answer, spec, env, request),
        functools.partial(first_answer, spec, env, request, source=bare),
        rounds,
        functools.partial(first_answer_template, template, spec, env, request),
        functools.partial(first_answer_template, template, spec, env, request, source=bare))
    key = name.replace('-', '_')
    details: dict[str, Any] = {"first_request": " ".join(request[:2]), "rounds": rounds,
                               "workers": spec.workers, "threads": spec.threads}
    baseline = f"bare functions-framework function ({spec.signature}), plain start (a new interpreter)"
    plain_note = {"path": "plain: a new interpreter from the venv, spawn to first answer"}
    template_note = {"path": "template: fork from the running template process to first answer "
                             "(make dev's scale from zero)", **template_details}
    wall, cpu = (lambda xs: median([x[0] for x in xs])), (lambda xs: median([x[1] for x in xs]))
    return [
        Figure(f"cold_start_ms_{key}", wall(plain), "ms", baseline, wall(base),
               {**details, **plain_note, "top_imports": top_imports(f"functions.{spec.module_dir}.main")}),
        Figure(f"cold_start_cpu_ms_{key}", cpu(plain), "ms", baseline, cpu(base), {**details, **plain_note}),
        Figure(f"cold_start_ms_template_{key}", wall(forked), "ms", baseline, wall(base),
               {**details, **template_note, "bare_from_template_ms": round(wall(bare_forked), 1),
                "top_imports_after_template": top_imports(f"functions.{spec.module_dir}.main", after_template=True)}),
        Figure(f"cold_start_cpu_ms_template_{key}", cpu(forked), "ms", baseline, cpu(base),
               {**details, **template_note, "bare_from_template_cpu_ms": round(cpu(bare_forked), 1)}),
    ]
