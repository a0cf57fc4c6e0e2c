"""The drift check: do the Knative manifests and ``stack.yml`` describe the same graph
as ``infra/runtime/taskforge.yaml`` (read through ``infra.runtime.config``)?

:func:`problems` is pure: it takes the parsed graph, the rendered Knative objects, the
parsed ``stack.yml`` and the event types the code publishes, and returns one readable
line per disagreement (empty when everything agrees). Tests feed it the real files,
and mutated copies to show each kind of drift is caught.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from events import catalog
from infra.runtime.config import DeliverySpec, FunctionSpec, RuntimeConfig, parse_duration

SERVICE_API = "serving.knative.dev/v1"
PARALLELISM = "rabbitmq.eventing.knative.dev/parallelism"
RETENTION = "autoscaling.knative.dev/scale-to-zero-pod-retention-period"
CRON_TOPIC = "cron-function"
_GO_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?$")


def go_duration_s(text: str) -> float:
    """Seconds in a Go duration such as ``90s``, ``2m``, ``1h30m`` (what Knative and
    OpenFaaS annotations use). Raises ``ValueError`` otherwise."""
    m = _GO_DURATION.match(text.strip())
    if not text.strip() or not m or not any(m.groups()):
        raise ValueError(f"not a duration like 90s, 2m or 1h30m: {text!r}")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


def published_types() -> set[str]:
    """Every event type the catalogue declares (events/catalog.py): what can be published."""
    out = {v for k, v in vars(catalog).items()
           if k.isupper() and isinstance(v, str) and (v.startswith(catalog.PREFIX + ".") or v == catalog.PING)}
    return out | {catalog.requested_type(t) for t in catalog.TASK_TYPES}


def consumed_types() -> set[str]:
    """Types that must reach a function: every task type's ``*.requested``."""
    return {catalog.requested_type(t) for t in catalog.TASK_TYPES}


def problems(graph: RuntimeConfig, knative: Iterable[Mapping[str, Any]], stack: Mapping[str, Any],
             published: set[str], consumed: set[str],
             funcs: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """``funcs`` (function name -> parsed ``func.yaml``), when given, is checked too."""
    objs = list(knative)
    out: list[str] = []
    out += _functions(graph, objs, stack)
    out += _triggers(graph, objs)
    out += _types(graph, objs, published, consumed)
    out += _dead_letter_sinks(graph, objs)
    out += _scaling_and_timeouts(graph, objs)
    out += _openfaas(graph, stack)
    if funcs is not None:
        out += func_yaml_problems(graph, objs, stack, funcs)
    return out


# --- pieces ------------------------------------------------------------------------------

def _of_kind(objs: list[Mapping[str, Any]], kind: str) -> dict[str, Mapping[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o.get("kind") == kind}


def _functions(graph: RuntimeConfig, objs: list[Mapping[str, Any]], stack: Mapping[str, Any]) -> list[str]:
    places = {
        "infra/runtime/taskforge.yaml": set(graph.functions),
        "knative/ (Services)": set(_of_kind(objs, "Service")),
        "stack.yml": set((stack.get("functions") or {}).keys()),
    }
    every = set().union(*places.values())
    out = []
    for name in sorted(every):
        missing = [p for p, names in places.items() if name not in names]
        if missing:
            out.append(f"function {name!r} is missing from {', '.join(missing)}")
    return out


def _delivery_problems(where: str, want: DeliverySpec, got: Mapping[str, Any] | None) -> list[str]:
    if not got:
        return [f"{where}: no delivery spec (expected retry {want.retry}, {want.backoff_policy})"]
    out = []
    if got.get("retry") != want.retry:
        out.append(f"{where}: retry {got.get('retry')!r} != {want.retry}")
    if got.get("backoffPolicy") != want.backoff_policy:
        out.append(f"{where}: backoffPolicy {got.get('backoffPolicy')!r} != {want.backoff_policy!r}")
    for key, want_s in (("backoffDelay", want.backoff_delay_s), ("timeout", want.timeout_s)):
        raw = got.get(key)
        try:
            got_s = parse_duration(raw if isinstance(raw, str) else "")
        except ValueError:
            out.append(f"{where}: {key} {got.get(key)!r} is not an ISO-8601 duration")
            continue
        if abs(got_s - want_s) > 1e-6:
            out.append(f"{where}: {key} {got.get(key)} ({got_s:g} s) != {want_s:g} s")
    sink = ((got.get("deadLetterSink") or {}).get("ref") or {}).get("name")
    if want.dead_letter_sink and sink != want.dead_letter_sink:
        out.append(f"{where}: deadLetterSink {sink!r} != {want.dead_letter_sink!r}")
    return out


def _triggers(graph: RuntimeConfig, objs: list[Mapping[str, Any]]) -> list[str]:
    kn = _of_kind(objs, "Trigger")
    out = []
    for name in sorted(set(kn) - set(graph.triggers)):
        out.append(f"trigger {name!r} exists only in knative/, not in infra/runtime/taskforge.yaml")
    for name, t in graph.triggers.items():
        obj = kn.get(name)
        where = f"knative Trigger {name!r}"
        if obj is None:
            out.append(f"trigger {name!r} of infra/runtime/taskforge.yaml has no Trigger in knative/")
            continue
        spec = obj.get("spec", {})
        attrs = dict((spec.get("filter") or {}).get("attributes") or {})
        if attrs != dict(t.filter):
            out.append(f"{where}: filter {attrs} != {dict(t.filter)}")
        sub = spec.get("subscriber") or {}
        ref = sub.get("ref") or {}
        if (ref.get("apiVersion"), ref.get("kind"), ref.get("name")) != (SERVICE_API, "Service", t.subscriber):
            out.append(f"{where}: subscriber {ref} is not the Knative Service {t.subscriber!r}")
        want_uri = None if t.path == "/" else t.path
        if sub.get("uri") != want_uri:
            out.append(f"{where}: subscriber uri {sub.get('uri')!r} != path {t.path!r}")
        par = (obj.get("metadata", {}).get("annotations") or {}).get(PARALLELISM)
        if par != str(t.parallelism):
            out.append(f"{where}: annotation {PARALLELISM} {par!r} != {str(t.parallelism)!r}")
        out += _delivery_problems(where, t.delivery, spec.get("delivery"))
    broker = _of_kind(objs, "Broker")
    if graph.broker.delivery is not None:
        for bname, b in broker.items():
            out += _delivery_problems(f"knative Broker {bname!r}", graph.broker.delivery, b["spec"].get("delivery"))
    return out


def _types(graph: RuntimeConfig, objs: list[Mapping[str, Any]], published: set[str],
           consumed: set[str]) -> list[str]:
    out = []
    filtered: dict[str, str] = {}
    for name, t in graph.triggers.items():
        filtered[t.type] = f"trigger {name!r} (infra/runtime/taskforge.yaml)"
    for name, obj in _of_kind(objs, "Trigger").items():
        typ = ((obj.get("spec", {}).get("filter") or {}).get("attributes") or {}).get("type")
        if typ is None:
            out.append(f"knative Trigger {name!r} has no type filter: it would receive every event")
        else:
            filtered.setdefault(typ, f"knative Trigger {name!r}")
    for typ, where in sorted(filtered.items()):
        if typ not in published:
            out.append(f"{where} filters type {typ!r}, which no one publishes (not in events/catalog.py)")
    for typ in sorted(consumed - set(filtered)):
        out.append(f"type {typ!r} is published but no trigger delivers it to a function")
    if catalog.PING in filtered:
        pings = [o for o in _of_kind(objs, "PingSource").values()
                 if ((o["spec"].get("sink") or {}).get("ref") or {}).get("kind") == "Broker"]
        if not pings:
            out.append(f"a trigger filters {catalog.PING!r} but no PingSource sends it into the Broker")
        if graph.ticker is None or graph.ticker.type != catalog.PING:
            out.append(f"the local ticker does not send {catalog.PING!r}, which a trigger filters")
        for p in pings:
            if graph.ticker is not None and p["spec"].get("schedule") != graph.ticker.schedule:
                out.append(f"PingSource {p['metadata']['name']!r} schedule {p['spec'].get('schedule')!r} "
                           f"!= ticker.schedule {graph.ticker.schedule!r}")
    return out


def _dead_letter_sinks(graph: RuntimeConfig, objs: list[Mapping[str, Any]]) -> list[str]:
    out = []
    for kind in ("Trigger", "Broker"):
        for name, obj in _of_kind(objs, kind).items():
            d = obj.get("spec", {}).get("delivery")
            sink = (d or {}).get("deadLetterSink") or {}
            if not d:
                if kind == "Trigger":
                    out.append(f"knative Trigger {name!r} has no delivery of its own")
                continue
            if not (sink.get("ref") or sink.get("uri")):
                out.append(f"knative {kind} {name!r}: delivery without a deadLetterSink "
                           "(exhausted events would be dropped)")
    for name, t in graph.triggers.items():
        if t.delivery.dead_letter_sink is None:
            out.append(f"trigger {name!r} of infra/runtime/taskforge.yaml: delivery without a deadLetterSink")
    return out


def _scaling_and_timeouts(graph: RuntimeConfig, objs: list[Mapping[str, Any]]) -> list[str]:
    out = []
    services = _of_kind(objs, "Service")
    for name, f in graph.functions.items():
        svc = services.get(name)
        if svc is None:
            continue
        tmpl = svc["spec"]["template"]
        ann = (tmpl.get("metadata") or {}).get("annotations") or {}
        # Keeping a function warm is always allowed (prod keeps the dead-letter sink up);
        # when it does scale to zero, it waits as long as the local stack does.
        if f.min_scale == 0 and ann.get("autoscaling.knative.dev/min-scale", "0") == "0":
            raw = ann.get(RETENTION)
            try:
                retention = go_duration_s(raw) if raw else None
            except ValueError:
                retention = None
            if retention != f.idle_s:
                out.append(f"knative Service {name!r}: {RETENTION} {raw!r} != idle_s {f.idle_s:g} s")
        out += _concurrency(f"knative Service {name!r}", f, tmpl["spec"].get("containerConcurrency", 0),
                            _container_env(tmpl["spec"]))
        timeout = tmpl["spec"].get("timeoutSeconds")
        needs = [t.delivery.timeout_s for t in graph.triggers.values() if t.subscriber == name]
        if name == graph.dead_letter.subscriber:
            needs.append(graph.dead_letter.delivery.timeout_s)
        if needs and (timeout is None or timeout < max(needs)):
            out.append(f"knative Service {name!r}: timeoutSeconds {timeout} is shorter than the delivery "
                       f"timeout {max(needs):g} s of what it receives")
    return out


def _container_env(pod_spec: Mapping[str, Any]) -> dict[str, str]:
    containers = pod_spec.get("containers") or [{}]
    return {e.get("name"): str(e.get("value")) for e in containers[0].get("env") or [] if "value" in e}


def _concurrency(where: str, f: FunctionSpec, concurrency: Any, env: Mapping[str, Any]) -> list[str]:
    """One instance serves ``workers x threads`` requests at once: the platform's
    concurrency, WORKERS and THREADS must say the same as the graph."""
    out = []
    if concurrency != f.concurrency and str(concurrency) != str(f.concurrency):
        out.append(f"{where}: concurrency {concurrency!r} != workers x threads {f.concurrency} of the graph")
    if f.signature == "asgi":
        return out
    if str(env.get("WORKERS", "1")) != str(f.workers):
        out.append(f"{where}: WORKERS {env.get('WORKERS', '1')!r} != workers {f.workers} of the graph")
    if str(env.get("THREADS")) != str(f.threads):
        out.append(f"{where}: THREADS {env.get('THREADS')!r} != threads {f.threads} of the graph")
    return out


def _openfaas(graph: RuntimeConfig, stack: Mapping[str, Any]) -> list[str]:
    out = []
    fns = stack.get("functions") or {}
    for name, f in graph.functions.items():
        fn = fns.get(name)
        if fn is None:
            continue
        where = f"stack.yml function {name!r}"
        ann = fn.get("annotations") or {}
        args = fn.get("build_args") or {}
        if args.get("FUNCTION") != name:
            out.append(f"{where}: build_args.FUNCTION {args.get('FUNCTION')!r} != {name!r}")
        if args.get("TARGET", "handle") != f.target:
            out.append(f"{where}: build_args.TARGET {args.get('TARGET', 'handle')!r} != target {f.target!r}")
        asgi = str(args.get("ASGI", "false")).lower() == "true"
        if asgi != (f.signature == "asgi"):
            out.append(f"{where}: build_args.ASGI {args.get('ASGI')!r} does not match signature {f.signature!r}")
        sig = args.get("SIGNATURE", "http")
        if sig != ("cloudevent" if f.signature == "cloudevent" else "http"):
            out.append(f"{where}: build_args.SIGNATURE {sig!r} does not match signature {f.signature!r}")
        direct = sorted({t.type for t in graph.triggers.values() if t.subscriber == name and t.path == "/"})
        if ann.get("topic") == CRON_TOPIC or "schedule" in ann:
            out.append(f"{where}: on the cron-connector, whose ticks are unsigned and refused; the bridge ticks")
        if direct:
            topics = sorted(p.strip() for p in str(ann.get("topic", "")).split(",") if p.strip())
            if topics != direct:
                out.append(f"{where}: topic {ann.get('topic')!r} != the types it consumes {','.join(direct)!r}")
        elif "topic" in ann:
            out.append(f"{where}: topic {ann['topic']!r} but no trigger delivers to it at its root path")
        labels = fn.get("labels") or {}
        if f.signature != "asgi":
            if labels.get("com.openfaas.scale.type") != "capacity":
                out.append(f"{where}: com.openfaas.scale.type {labels.get('com.openfaas.scale.type')!r} != 'capacity'")
            out += _concurrency(where, f, labels.get("com.openfaas.scale.target"), fn.get("environment") or {})
        if f.min_scale == 0 and labels.get("com.openfaas.scale.zero") == "true":
            raw = labels.get("com.openfaas.scale.zero-duration")
            try:
                idle = go_duration_s(raw) if raw else None
            except ValueError:
                idle = None
            if idle != f.idle_s:
                out.append(f"{where}: com.openfaas.scale.zero-duration {raw!r} != idle_s {f.idle_s:g} s")
    return out


# --- Knative func (func.yaml per function) ------------------------------------------------

FUNC_SECRETS_PATH = "/etc/taskforge/secrets"


def _number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def func_yaml_problems(graph: RuntimeConfig, objs: list[Mapping[str, Any]], stack: Mapping[str, Any],
                       funcs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Each function's ``func.yaml`` against its Knative Service (scale, concurrency,
    resources, THREADS, the secrets volume), stack.yml (image) and the graph (whether it
    is invoked with CloudEvents). Keys are function names; ``funcs`` holds the parsed files."""
    out = []
    services = _of_kind(objs, "Service")
    fns = stack.get("functions") or {}
    cloudevent = {t.subscriber for t in graph.triggers.values() if t.path == "/"} | {graph.dead_letter.subscriber}
    for name in sorted(set(graph.functions) - set(funcs)):
        out.append(f"function {name!r} has no func.yaml (functions/{graph.functions[name].module_dir}/func.yaml)")
    for name in sorted(set(funcs) - set(graph.functions)):
        out.append(f"func.yaml {name!r} describes a function infra/runtime/taskforge.yaml does not have")
    for name, fy in sorted(funcs.items()):
        if name not in graph.functions:
            continue
        where = f"func.yaml of {name!r}"
        if fy.get("name") != name:
            out.append(f"{where}: name {fy.get('name')!r} != {name!r}")
        if fy.get("runtime") != "python":
            out.append(f"{where}: runtime {fy.get('runtime')!r} != 'python'")
        if not fy.get("specVersion") or not (fy.get("build") or {}).get("builder"):
            out.append(f"{where}: specVersion and build.builder are required")
        want_image = (fns.get(name) or {}).get("image")
        if want_image and fy.get("image") != want_image:
            out.append(f"{where}: image {fy.get('image')!r} != stack.yml's {want_image!r}")
        invoke = "cloudevent" if name in cloudevent else "http"
        if fy.get("invoke") != invoke:
            out.append(f"{where}: invoke {fy.get('invoke')!r} != {invoke!r}")
        deploy = fy.get("deploy") or {}
        health = deploy.get("healthEndpoints") or {}
        if health != {"liveness": "/healthz", "readiness": "/readyz"}:
            out.append(f"{where}: healthEndpoints {health} != liveness /healthz, readiness /readyz")
        run = fy.get("run") or {}
        volumes = run.get("volumes") or []
        if not any(v.get("secret") and v.get("path") == FUNC_SECRETS_PATH for v in volumes):
            out.append(f"{where}: no secret volume at {FUNC_SECRETS_PATH} (settings read *_FILE there)")
        svc = services.get(name)
        if svc is None:
            continue
        tmpl = svc["spec"]["template"]
        ann = (tmpl.get("metadata") or {}).get("annotations") or {}
        spec = tmpl["spec"]
        container = spec["containers"][0]
        opts = deploy.get("options") or {}
        scale = opts.get("scale") or {}
        for key, annotation in (("min", "min-scale"), ("max", "max-scale"), ("target", "target")):
            got, want = _number(scale.get(key)), _number(ann.get(f"autoscaling.knative.dev/{annotation}"))
            if got != want:
                out.append(f"{where}: scale.{key} {scale.get(key)!r} != Knative {annotation} "
                           f"{ann.get(f'autoscaling.knative.dev/{annotation}')!r}")
        if scale.get("metric") != ann.get("autoscaling.knative.dev/metric", "concurrency"):
            out.append(f"{where}: scale.metric {scale.get('metric')!r} != Knative's "
                       f"{ann.get('autoscaling.knative.dev/metric')!r}")
        resources = opts.get("resources") or {}
        limits = dict(resources.get("limits") or {})
        concurrency = limits.pop("concurrency", None)
        if concurrency != spec.get("containerConcurrency", 0):
            out.append(f"{where}: limits.concurrency {concurrency!r} != containerConcurrency "
                       f"{spec.get('containerConcurrency', 0)!r}")
        kres = container.get("resources") or {}
        for part, got in (("requests", dict(resources.get("requests") or {})), ("limits", limits)):
            want = {k: str(v) for k, v in (kres.get(part) or {}).items()}
            if {k: str(v) for k, v in got.items()} != want:
                out.append(f"{where}: resources.{part} {got} != Knative's {want}")
        want_env = {e["name"]: str(e.get("value")) for e in container.get("env") or [] if "name" in e}
        got_env = {e["name"]: str(e.get("value")) for e in run.get("envs") or [] if "name" in e}
        if got_env != want_env:
            out.append(f"{where}: run.envs {got_env} != the Knative Service's env {want_env}")
    return out
