"""stack.yml against the documented OpenFaaS stack format (a JSON Schema of the fields
faas-cli reads), the OpenFaaS conventions docs/architecture.md §7 names, and the RabbitMQ-to-OpenFaaS
bridge — its manifest, and the bridge itself delivering real RabbitMQ messages to a
stand-in gateway on loopback."""
from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jsonschema
import kubernetes_validate
import pika
import pytest
import yaml

from events import amqp, catalog, codec
from infra.openfaas import bridge
from infra.runtime import topology
from infra.runtime.config import load_config, parse_config
from shared import delivery_auth
from shared.broker import exchange_name
from shared.settings import Settings
from tests.deploy.k8s import ROOT, kustomize
from tests.threaded_server import serving

SCHEMA = json.loads((ROOT / "tests" / "deploy" / "schemas" / "openfaas-stack.schema.json").read_text())
SCALE_KEYS = ("com.openfaas.scale.min", "com.openfaas.scale.type", "com.openfaas.scale.target", "com.openfaas.scale.max", "com.openfaas.scale.zero",
              "com.openfaas.scale.zero-duration")
SECRETS_DIR = "/var/openfaas/secrets/"


@pytest.fixture(scope="module")
def stack() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "stack.yml").read_text(encoding="utf-8"))


def errors(doc: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(doc)]


def environment(stack: dict[str, Any], name: str) -> dict[str, str]:
    """A function's environment as faas-cli merges it: the files in order, then its own."""
    fn = stack["functions"][name]
    env: dict[str, str] = {}
    for rel in fn.get("environment_file", []):
        doc = yaml.safe_load((ROOT / rel).read_text(encoding="utf-8"))
        assert set(doc) == {"environment"}, f"{rel}: an environment file holds one `environment` map"
        assert all(isinstance(v, str) for v in doc["environment"].values()), f"{rel}: values must be strings"
        env.update(doc["environment"])
    env.update(fn.get("environment", {}))
    return env


def test_schema_is_a_valid_json_schema():
    jsonschema.Draft7Validator.check_schema(SCHEMA)


def test_stack_follows_the_documented_format(stack):
    assert errors(stack) == []
    assert stack["provider"]["name"] == "openfaas" and str(stack["version"]) == "1.0"


@pytest.mark.parametrize(("path", "value", "expected"), [
    (("functions", "gateway", "anotations"), {}, "anotations"),
    (("functions", "gateway", "labels", "com.openfaas.scale.min"), 1, "is not of type 'string'"),
    (("functions", "gateway", "environment", "THREADS"), 16, "is not of type 'string'"),
    (("provider", "name"), "faas", "'openfaas' was expected"),
    (("functions", "resize-image", "limits", "memory"), "1.5 GB", "does not match"),
])
def test_schema_catches_typos_and_wrong_types(stack, path, value, expected):
    doc = copy.deepcopy(stack)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert any(expected in e for e in errors(doc)), errors(doc)


def test_scaling_keys_are_labels_and_routing_keys_are_annotations(stack):
    for name, fn in stack["functions"].items():
        labels, ann = fn.get("labels", {}), fn.get("annotations", {})
        assert not [k for k in ann if k.startswith("com.openfaas.scale.")], f"{name}: scaling keys are labels"
        assert "topic" not in labels and "schedule" not in labels, f"{name}: topic/schedule are annotations"
        assert set(labels) <= set(SCALE_KEYS), name
        assert int(labels["com.openfaas.scale.min"]) >= 1 and int(labels["com.openfaas.scale.max"]) >= 1
        assert labels["com.openfaas.scale.zero"] in ("true", "false")
        if labels["com.openfaas.scale.zero"] == "true":
            assert "com.openfaas.scale.zero-duration" in labels, name
        assert ann["com.openfaas.health.http.path"] == "/healthz", name
    assert stack["functions"]["status-stream"]["labels"]["com.openfaas.scale.zero"] == "false"


def _cron_field_ok(field: str, lo: int, hi: int) -> bool:
    for part in field.split(","):
        rng, _, step = part.partition("/")
        if step and not (step.isdigit() and int(step) > 0):
            return False
        if rng == "*":
            continue
        a, _, b = rng.partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            return False
        if not lo <= int(a) <= (int(b) if b else int(a)) <= hi:
            return False
    return True


def test_the_sweeper_is_ticked_by_the_bridge_not_the_cron_connector(stack):
    """The cron-connector cannot sign its requests and the functions refuse unsigned ones,
    so nothing is on it: the bridge publishes the tick and delivers it signed."""
    assert not [n for n, f in stack["functions"].items() if f["annotations"].get("topic") == "cron-function"]
    assert all("schedule" not in f["annotations"] for f in stack["functions"].values())
    ann = stack["functions"]["outbox-sweeper"]["annotations"]
    assert sorted(ann["topic"].split(",")) == [catalog.OUTBOX_SWEEP, catalog.PING]
    assert bridge.build_parser().parse_args(["--gateway-url", "http://g"]).tick_interval_s == 60


def _loads_in_production(env: dict[str, str], tmp_path) -> None:
    """The settings of a manifest's environment load (production checks included), with
    every secret file replaced by a plausible value."""
    from shared.settings import load_settings

    real = {}
    for key, value in env.items():
        if key.endswith("_FILE") and key.startswith("TASKFORGE_"):
            path = tmp_path / key
            path.write_text("amqp://u:p@mq/" if "AMQP" in key else "x" * 40)
            real[key] = str(path)
        else:
            real[key] = value
    load_settings(real)


def test_every_openfaas_manifest_starts_in_production_mode(stack, tmp_path):
    for name in stack["functions"]:
        _loads_in_production({k: str(v) for k, v in environment(stack, name).items()}, tmp_path)
    for obj in kustomize(ROOT / "infra" / "openfaas"):
        (c,) = obj["spec"]["template"]["spec"]["containers"]
        _loads_in_production({e["name"]: e["value"] for e in c["env"]}, tmp_path)


def test_functions_and_the_bridge_share_the_delivery_secret(stack):
    env = environment(stack, "dead-letter")
    assert env["TASKFORGE_DELIVERY_AUTH"] == "signature"
    assert env["TASKFORGE_DELIVERY_SECRET_FILE"] == SECRETS_DIR + "taskforge-delivery-secret"
    dep = next(o for o in kustomize(ROOT / "infra" / "openfaas") if o["kind"] == "Deployment")
    benv = {e["name"]: e["value"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert benv["TASKFORGE_DELIVERY_AUTH"] == "signature"
    assert benv["TASKFORGE_DELIVERY_SECRET_FILE"].startswith("/etc/taskforge/secrets/")


def test_environment_and_secrets(stack):
    known = {f"TASKFORGE_{f.name.upper()}" for f in fields(Settings)}
    secret_sets = set()
    for name, fn in stack["functions"].items():
        env = environment(stack, name)
        assert env["TASKFORGE_FUNCTION_NAME"] == name
        for key, value in env.items():
            if key.startswith("TASKFORGE_"):
                assert key.removesuffix("_FILE") in known, f"{name}: {key} is not a setting"
            if key.endswith("_FILE"):
                assert value.startswith(SECRETS_DIR), f"{name}: {key}"
                assert value.removeprefix(SECRETS_DIR) in fn["secrets"], f"{name}: {key} needs its secret"
        for secret in ("DATABASE_URL", "REDIS_URL", "AMQP_URL", "JWT_SECRET"):
            assert f"TASKFORGE_{secret}" not in env, f"{name}: secrets are files, never environment"
        secret_sets.add(tuple(fn["secrets"]))
        if "THREADS" in env:
            assert env["THREADS"].isdigit()
    assert len(secret_sets) == 1


def test_settings_agree_with_the_knative_config_map(stack):
    """The same tunables on both platforms: attempts and job caps."""
    cm = next(o for o in kustomize(ROOT / "knative" / "base") if o["kind"] == "ConfigMap")["data"]
    env = environment(stack, "compress-video")
    for key in ("TASKFORGE_MAX_ATTEMPTS", "TASKFORGE_VIDEO_TIMEOUT_S", "TASKFORGE_PDF_TIMEOUT_S",
                "TASKFORGE_FETCH_TIMEOUT_S", "TASKFORGE_ENV", "TASKFORGE_BROKER_NAME", "TASKFORGE_STORAGE_BACKEND"):
        assert env[key] == cm[key], key


def test_images_build_from_the_one_dockerfile(stack):
    for name, fn in stack["functions"].items():
        assert fn["lang"] == "dockerfile" and fn["handler"] == "./", name
        assert (ROOT / fn["handler"] / "Dockerfile").is_file()
        assert fn["image"] == f"taskforge/{name}:0.1.0"


# --- the bridge ---------------------------------------------------------------------------

def test_bridge_and_migration_manifests():
    objs = {o["kind"]: o for o in kustomize(ROOT / "infra" / "openfaas")}
    assert set(objs) == {"Deployment", "Job"}
    for obj in objs.values():
        kubernetes_validate.validate(obj, "1.32.0", strict=True)
        assert obj["metadata"]["namespace"] == "openfaas"
        spec = obj["spec"]["template"]["spec"]
        assert spec["volumes"] == [{"name": "secrets", "secret": {"secretName": "taskforge"}}]
        (c,) = spec["containers"]
        files = {e["name"]: e["value"] for e in c["env"] if e["name"].endswith("_FILE")}
        assert {"TASKFORGE_AMQP_URL_FILE", "TASKFORGE_JWT_SECRET_FILE"} <= set(files)
        assert all(v.startswith("/etc/taskforge/secrets/") for v in files.values())
    job = objs["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["taskforge", "migrate"] and job["image"] == "taskforge/gateway:0.1.0"
    dep = objs["Deployment"]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["python", "-m", "infra.openfaas.bridge"]
    args = bridge.build_parser().parse_args(c["args"])  # the manifest's flags are the CLI's
    assert args.gateway_url == "http://gateway.openfaas:8080"
    assert c["ports"][0]["containerPort"] == args.metrics_port
    assert c["image"] == "taskforge/gateway:0.1.0"
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["TASKFORGE_AMQP_URL_FILE"].startswith("/etc/taskforge/secrets/")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.parametrize(("path", "url"), [
    ("/", "http://gateway.openfaas:8080/function/resize-image"),
    ("/events", "http://gateway.openfaas:8080/function/resize-image/events"),
])
def test_function_urls(path, url):
    assert bridge.function_url("http://gateway.openfaas:8080/", "resize-image", path) == url


@pytest.mark.parametrize("bad", ["gateway.openfaas:8080", "ftp://gateway", "http://"])
def test_function_url_refuses_a_relative_gateway(bad):
    with pytest.raises(ValueError):
        bridge.function_url(bad, "x")


def test_bridge_serves_every_trigger_of_the_graph(base_settings):
    graph = load_config()
    ds = {d.name: d for d in bridge.dispatchers(graph, base_settings, "http://gateway.openfaas:8080")}
    assert set(ds) == set(graph.triggers) | {"dead-letter"}
    for name, t in graph.triggers.items():
        d = ds[name]
        assert d.url == bridge.function_url("http://gateway.openfaas:8080", t.subscriber, t.path)
        assert (d.delivery, d.parallelism) == (t.delivery, t.parallelism)
        assert d.dead_letter is not None
    assert ds["dead-letter"].url == "http://gateway.openfaas:8080/function/dead-letter"
    assert ds["dead-letter"].dead_letter is None
    assert ds["task-submitted"].url.endswith("/function/gateway/events")


class _Gateway(ThreadingHTTPServer):
    """Stands in for the OpenFaaS gateway on loopback: records each POST and answers
    500 for the function named `broken`, 200 otherwise."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _GatewayHandler)
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()


class _GatewayHandler(BaseHTTPRequestHandler):
    server: _Gateway

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with self.server.lock:
            self.server.calls.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                      "body": body})
        status = 500 if self.path.startswith("/function/broken") else 200
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()


@pytest.fixture()
def gateway() -> Iterator[_Gateway]:
    with serving(_Gateway()) as server:
        yield server


def _publish(settings: Settings, *events: Any) -> None:
    with topology.blocking_channel(settings) as ch:
        ch.confirm_delivery()
        for e in events:
            headers, props, body = amqp.to_amqp(e)
            ch.basic_publish(exchange_name(settings), "", body, pika.BasicProperties(headers=headers, **props),
                             mandatory=True)


def _wait_for(predicate: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("the bridge did not deliver in time")
        time.sleep(0.05)


def test_bridge_delivers_rabbitmq_events_to_openfaas_functions(base_settings, gateway):
    """Real RabbitMQ, the real bridge: events reach /function/<name><path> in binary mode,
    and one whose function keeps failing ends at /function/dead-letter after its retries."""
    settings = base_settings.replace(broker_name=f"{base_settings.broker_name}-bridge",
                                     delivery_secret="b" * 40, delivery_auth="signature")
    fast = {"backoffPolicy": "linear", "backoffDelay": "PT0.01S", "timeout": "PT5S", "deadLetterSink": "dead-letter"}
    graph = parse_config({
        "functions": {"worker": {"port": 18001}, "broken": {"port": 18002}, "dead-letter": {"port": 18003}},
        "ticker": {"type": "test.bridge.tick"},
        "triggers": {
            "work": {"type": "test.bridge.work", "subscriber": "worker", "path": "/events",
                     "delivery": {**fast, "retry": 0}},
            "fail": {"type": "test.bridge.fail", "subscriber": "broken", "delivery": {**fast, "retry": 2}},
            "tick": {"type": "test.bridge.tick", "subscriber": "worker", "delivery": {**fast, "retry": 0}},
        },
        "dead_letter": {"subscriber": "dead-letter", "delivery": {"retry": 1, "timeout": "PT5S"}},
    })
    url = f"http://127.0.0.1:{gateway.server_address[1]}"
    stop = threading.Event()
    runner = threading.Thread(target=bridge.run, args=(graph, settings, url, stop, 0.2), daemon=True)
    runner.start()
    try:
        _wait_for(lambda: _declared(settings, graph))
        ok = codec.make_event({"specversion": "1.0", "id": str(uuid.uuid4()), "type": "test.bridge.work",
                               "source": "/tests/deploy", "subject": "task-1",
                               "datacontenttype": "application/json"}, {"n": 1})
        bad = codec.make_event({"specversion": "1.0", "id": str(uuid.uuid4()), "type": "test.bridge.fail",
                                "source": "/tests/deploy", "datacontenttype": "application/json"}, {"n": 2})
        _publish(settings, ok, bad)

        def ids(path: str) -> list[str]:
            with gateway.lock:
                return [c["headers"].get("ce-id") for c in gateway.calls if c["path"] == path]

        _wait_for(lambda: ids("/function/dead-letter") == [bad["id"]])
        assert ids("/function/worker/events") == [ok["id"]]
        assert ids("/function/broken") == [bad["id"]] * 3  # retry 2: three attempts, then dead-lettered
        with gateway.lock:
            call = next(c for c in gateway.calls if c["path"] == "/function/worker/events")
            dead = next(c for c in gateway.calls if c["path"] == "/function/dead-letter")
        assert call["headers"]["ce-type"] == "test.bridge.work" and call["headers"]["ce-subject"] == "task-1"
        assert json.loads(call["body"]) == {"n": 1}
        assert dead["headers"]["ce-knativeerrordest"].endswith("/function/broken")
        assert dead["headers"]["ce-knativeerrorcode"] == "500"
        _wait_for(lambda: len(ids("/function/worker")) >= 1)  # the bridge's own tick
        with gateway.lock:
            calls = list(gateway.calls)
        for c in calls:  # every delivery is signed with the shared secret
            delivery_auth.verify(settings, c["headers"], c["body"])
    finally:
        stop.set()
        runner.join(timeout=30)
        topology.delete(settings, graph)
    assert not runner.is_alive()


def _declared(settings: Settings, graph: Any) -> bool:
    try:
        with topology.blocking_channel(settings) as ch:
            for q in topology.plan(settings, graph).queues:
                ch.queue_declare(q, passive=True)
        return True
    except Exception:
        return False
