"""One source of truth: infra/runtime/taskforge.yaml, knative/ and stack.yml describe the
same functions, event types and delivery specs (docs/architecture.md §6, issue: "a test fails when
they drift"). The real files must agree; each kind of drift, injected into a copy,
must be reported."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from infra.runtime.config import FunctionSpec, RuntimeConfig, load_config
from tests.deploy import drift
from tests.deploy.k8s import ROOT, kustomize

OVERLAYS = ["base", "overlays/dev", "overlays/prod"]


@pytest.fixture(scope="module")
def graph() -> RuntimeConfig:
    return load_config(ROOT / "infra" / "runtime" / "taskforge.yaml")


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "stack.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {o: kustomize(ROOT / "knative" / o) for o in OVERLAYS}


def func_yamls() -> dict[str, dict[str, Any]]:
    """Every ``functions/*/func.yaml``, by the function name it declares (or its folder)."""
    out = {}
    for path in sorted((ROOT / "functions").glob("*/func.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        out[str(doc.get("name") or path.parent.name)] = doc
    return out


def check(graph: RuntimeConfig, objs: list[dict[str, Any]], stack: dict[str, Any],
          funcs: dict[str, dict[str, Any]] | None = None) -> list[str]:
    return drift.problems(graph, objs, stack, drift.published_types(), drift.consumed_types(), funcs)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_three_descriptions_agree(graph, rendered, stack, overlay):
    # func.yaml describes the base Service (overlays tune scale and resources per cluster).
    assert check(graph, rendered[overlay], stack, func_yamls() if overlay == "base" else None) == []


def test_every_function_and_trigger_of_the_graph_is_deployed(graph, rendered, stack):
    objs = rendered["base"]
    assert {o["metadata"]["name"] for o in objs if o["kind"] == "Service"} == set(graph.functions)
    assert {o["metadata"]["name"] for o in objs if o["kind"] == "Trigger"} == set(graph.triggers)
    assert set(stack["functions"]) == set(graph.functions)


def _find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def _drop(objs: list[dict[str, Any]], kind: str, name: str) -> list[dict[str, Any]]:
    return [o for o in objs if not (o["kind"] == kind and o["metadata"]["name"] == name)]


Mutation = Callable[[RuntimeConfig, list[dict[str, Any]], dict[str, Any]],
                    tuple[RuntimeConfig, list[dict[str, Any]], dict[str, Any]]]


def _graph_function(g, objs, st):
    extra = FunctionSpec(name="thumbnail", port=8099, target="handle")
    return dataclasses.replace(g, functions={**g.functions, "thumbnail": extra}), objs, st


def _stack_function_missing(g, objs, st):
    del st["functions"]["generate-pdf"]
    return g, objs, st


def _knative_service_missing(g, objs, st):
    return g, _drop(objs, "Service", "compress-video"), st


def _knative_only_trigger(g, objs, st):
    t = copy.deepcopy(_find(objs, "Trigger", "resize-image"))
    t["metadata"]["name"] = "resize-image-v2"
    return g, [*objs, t], st


def _graph_trigger_missing_in_knative(g, objs, st):
    return g, _drop(objs, "Trigger", "generate-pdf"), st


def _unpublished_type(g, objs, st):
    t = _find(objs, "Trigger", "resize-image")
    t["spec"]["filter"]["attributes"]["type"] = "com.taskforge.resize-image.requestd"
    return g, objs, st


def _type_nobody_consumes(g, objs, st):
    triggers = {k: v for k, v in g.triggers.items() if k != "compress-video"}
    return dataclasses.replace(g, triggers=triggers), _drop(objs, "Trigger", "compress-video"), st


def _trigger_without_dead_letter_sink(g, objs, st):
    del _find(objs, "Trigger", "generate-pdf")["spec"]["delivery"]["deadLetterSink"]
    return g, objs, st


def _broker_without_dead_letter_sink(g, objs, st):
    del _find(objs, "Broker", "taskforge")["spec"]["delivery"]["deadLetterSink"]
    return g, objs, st


def _graph_without_dead_letter_sink(g, objs, st):
    t = g.triggers["resize-image"]
    bad = dataclasses.replace(t, delivery=dataclasses.replace(t.delivery, dead_letter_sink=None))
    return dataclasses.replace(g, triggers={**g.triggers, "resize-image": bad}), objs, st


def _retry_differs(g, objs, st):
    _find(objs, "Trigger", "compress-video")["spec"]["delivery"]["retry"] = 5
    return g, objs, st


def _timeout_differs(g, objs, st):
    _find(objs, "Trigger", "compress-video")["spec"]["delivery"]["timeout"] = "PT300S"
    return g, objs, st


def _parallelism_differs(g, objs, st):
    _find(objs, "Trigger", "resize-image")["metadata"]["annotations"][drift.PARALLELISM] = "8"
    return g, objs, st


def _subscriber_differs(g, objs, st):
    _find(objs, "Trigger", "generate-pdf")["spec"]["subscriber"]["ref"]["name"] = "resize-image"
    return g, objs, st


def _path_lost(g, objs, st):
    del _find(objs, "Trigger", "task-submitted")["spec"]["subscriber"]["uri"]
    return g, objs, st


def _service_timeout_too_short(g, objs, st):
    _find(objs, "Service", "compress-video")["spec"]["template"]["spec"]["timeoutSeconds"] = 300
    return g, objs, st


def _retention_differs(g, objs, st):
    _find(objs, "Service", "resize-image")["spec"]["template"]["metadata"]["annotations"][drift.RETENTION] = "30s"
    return g, objs, st


def _no_ping_source(g, objs, st):
    return g, [o for o in objs if o["kind"] != "PingSource"], st


def _ping_schedule_differs(g, objs, st):
    next(o for o in objs if o["kind"] == "PingSource")["spec"]["schedule"] = "*/5 * * * *"
    return g, objs, st


def _openfaas_topic_differs(g, objs, st):
    st["functions"]["resize-image"]["annotations"]["topic"] = "com.taskforge.generate-pdf.requested"
    return g, objs, st


def _openfaas_back_on_the_cron_connector(g, objs, st):
    st["functions"]["outbox-sweeper"]["annotations"].update(topic="cron-function", schedule="* * * * *")
    return g, objs, st


def _openfaas_build_arg_differs(g, objs, st):
    st["functions"]["status-stream"]["build_args"]["ASGI"] = "false"
    return g, objs, st


def _openfaas_idle_differs(g, objs, st):
    st["functions"]["generate-pdf"]["labels"]["com.openfaas.scale.zero-duration"] = "10m"
    return g, objs, st


def _concurrency_differs(g, objs, st):
    _find(objs, "Service", "gateway")["spec"]["template"]["spec"]["containerConcurrency"] = 8
    return g, objs, st


def _graph_workers_differ(g, objs, st):
    spec = dataclasses.replace(g.functions["resize-image"], workers=1)
    return dataclasses.replace(g, functions={**g.functions, "resize-image": spec}), objs, st


def _openfaas_capacity_differs(g, objs, st):
    st["functions"]["dead-letter"]["labels"]["com.openfaas.scale.target"] = "4"
    return g, objs, st


def _openfaas_workers_differ(g, objs, st):
    del st["functions"]["gateway"]["environment"]["WORKERS"]
    return g, objs, st


CASES: list[tuple[Mutation, str]] = [
    (_graph_function, "function 'thumbnail' is missing from knative/ (Services), stack.yml"),
    (_stack_function_missing, "function 'generate-pdf' is missing from stack.yml"),
    (_knative_service_missing, "function 'compress-video' is missing from knative/ (Services)"),
    (_knative_only_trigger, "trigger 'resize-image-v2' exists only in knative/"),
    (_graph_trigger_missing_in_knative, "trigger 'generate-pdf' of infra/runtime/taskforge.yaml has no Trigger"),
    (_unpublished_type, "which no one publishes"),
    (_type_nobody_consumes, "'com.taskforge.compress-video.requested' is published but no trigger delivers it"),
    (_trigger_without_dead_letter_sink, "knative Trigger 'generate-pdf': delivery without a deadLetterSink"),
    (_broker_without_dead_letter_sink, "knative Broker 'taskforge': delivery without a deadLetterSink"),
    (_graph_without_dead_letter_sink, "trigger 'resize-image' of infra/runtime/taskforge.yaml: delivery without"),
    (_retry_differs, "knative Trigger 'compress-video': retry 5 != 3"),
    (_timeout_differs, "knative Trigger 'compress-video': timeout PT300S (300 s) != 600 s"),
    (_parallelism_differs, "parallelism '8' != '4'"),
    (_subscriber_differs, "knative Trigger 'generate-pdf': subscriber"),
    (_path_lost, "knative Trigger 'task-submitted': subscriber uri None != path '/events'"),
    (_service_timeout_too_short, "knative Service 'compress-video': timeoutSeconds 300 is shorter"),
    (_retention_differs, "knative Service 'resize-image': autoscaling.knative.dev/scale-to-zero-pod-retention"),
    (_no_ping_source, "no PingSource sends it into the Broker"),
    (_ping_schedule_differs, "schedule '*/5 * * * *' != ticker.schedule"),
    (_openfaas_topic_differs, "stack.yml function 'resize-image': topic"),
    (_openfaas_back_on_the_cron_connector, "on the cron-connector, whose ticks are unsigned"),
    (_openfaas_build_arg_differs, "stack.yml function 'status-stream': build_args.ASGI"),
    (_openfaas_idle_differs, "stack.yml function 'generate-pdf': com.openfaas.scale.zero-duration '10m'"),
    (_concurrency_differs, "knative Service 'gateway': concurrency 8 != workers x threads 16 of the graph"),
    (_graph_workers_differ, "knative Service 'resize-image': WORKERS '2' != workers 1 of the graph"),
    (_openfaas_capacity_differs, "stack.yml function 'dead-letter': concurrency '4' != workers x threads 10"),
    (_openfaas_workers_differ, "stack.yml function 'gateway': WORKERS '1' != workers 2 of the graph"),
]


@pytest.mark.parametrize(("mutate", "expected"), CASES, ids=[m.__name__.strip("_") for m, _ in CASES])
def test_each_kind_of_drift_is_reported(graph, rendered, stack, mutate, expected):
    g, objs, st = mutate(graph, copy.deepcopy(rendered["base"]), copy.deepcopy(stack))
    found = check(g, objs, st)
    assert any(expected in line for line in found), found


@pytest.mark.parametrize(("text", "seconds"), [("90s", 90), ("2m", 120), ("1h30m", 5400), ("0.5s", 0.5)])
def test_go_durations(text, seconds):
    assert drift.go_duration_s(text) == seconds


@pytest.mark.parametrize("text", ["", "2", "PT2M", "2 m", "5ms"])
def test_bad_go_durations_are_refused(text):
    with pytest.raises(ValueError):
        drift.go_duration_s(text)


def test_published_types_come_from_the_catalogue():
    types = drift.published_types()
    assert "com.taskforge.resize-image.requested" in types
    assert "dev.knative.sources.ping" in types
    assert "com.taskforge.task.submitted" in types
    assert not any(t.startswith("https://") for t in types)  # SCHEMA_BASE is not a type


# --- func.yaml ----------------------------------------------------------------------------

def _func_missing(funcs):
    del funcs["compress-video"]


def _func_concurrency(funcs):
    funcs["resize-image"]["deploy"]["options"]["resources"]["limits"]["concurrency"] = 8


def _func_scale(funcs):
    funcs["status-stream"]["deploy"]["options"]["scale"]["min"] = 0


def _func_image(funcs):
    funcs["generate-pdf"]["image"] = "taskforge/generate-pdf:0.0.9"


def _func_threads(funcs):
    funcs["dead-letter"]["run"]["envs"] = [e for e in funcs["dead-letter"]["run"]["envs"] if e.get("name") != "THREADS"]


def _func_secrets(funcs):
    funcs["gateway"]["run"]["volumes"] = []


def _func_readiness(funcs):
    funcs["outbox-sweeper"]["deploy"]["healthEndpoints"]["readiness"] = "/health/readiness"


def _func_invoke(funcs):
    funcs["resize-image"]["invoke"] = "http"


FUNC_CASES = [
    (_func_missing, "function 'compress-video' has no func.yaml"),
    (_func_concurrency, "func.yaml of 'resize-image': limits.concurrency 8 != containerConcurrency 2"),
    (_func_scale, "func.yaml of 'status-stream': scale.min 0 != Knative min-scale '1'"),
    (_func_image, "func.yaml of 'generate-pdf': image 'taskforge/generate-pdf:0.0.9' != stack.yml's"),
    (_func_threads, "func.yaml of 'dead-letter': run.envs {} != the Knative Service's env {'THREADS': '10'}"),
    (_func_secrets, "func.yaml of 'gateway': no secret volume at /etc/taskforge/secrets"),
    (_func_readiness, "func.yaml of 'outbox-sweeper': healthEndpoints"),
    (_func_invoke, "func.yaml of 'resize-image': invoke 'http' != 'cloudevent'"),
]


def test_a_func_yaml_per_function_agrees():
    funcs = func_yamls()
    assert set(funcs) == {p.parent.name.replace("_", "-") for p in (ROOT / "functions").glob("*/func.yaml")}
    assert set(funcs) == set(load_config().functions)


@pytest.mark.parametrize(("mutate", "expected"), FUNC_CASES, ids=[m.__name__.strip("_") for m, _ in FUNC_CASES])
def test_each_kind_of_func_yaml_drift_is_reported(graph, rendered, stack, mutate, expected):
    funcs = copy.deepcopy(func_yamls())
    mutate(funcs)
    found = check(graph, copy.deepcopy(rendered["base"]), stack, funcs)
    assert any(expected in line for line in found), found
