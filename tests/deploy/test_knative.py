"""knative/: builds with the real `kubectl kustomize`, every custom resource matches its
CRD's openAPIV3Schema (vendor/knative-crds), core resources pass `kubernetes-validate
--strict`, and the manifests say what docs/architecture.md §7 asks (annotation levels, probes,
scaling, delivery, secrets as files)."""
from __future__ import annotations

import copy
from dataclasses import fields
from typing import Any

import kubernetes_validate
import pytest
import yaml

from infra.runtime.config import load_config, parse_duration
from shared.settings import Settings
from tests.deploy.k8s import (
    ROOT,
    by_kind,
    crd_dir,
    kustomize,
    load_crd_schemas,
    schema_errors,
    template_annotations,
)

BUILDS = ["knative", "knative/base", "knative/overlays/dev", "knative/overlays/prod"]
CORE_KINDS = {"Namespace", "ServiceAccount", "ConfigMap", "Secret", "Job"}
K8S_VERSION = "1.32.0"
AUTOSCALING = "autoscaling.knative.dev/"
CLOUDEVENT_ONLY = {"outbox-sweeper", "resize-image", "compress-video", "generate-pdf", "dead-letter", "webhook-delivery"}


@pytest.fixture(scope="module")
def crds() -> dict[tuple[str, str], dict[str, Any]]:
    return load_crd_schemas(crd_dir())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {b: kustomize(ROOT / b) for b in BUILDS}


@pytest.fixture(scope="module")
def base(rendered) -> list[dict[str, Any]]:
    return rendered["knative/base"]


def test_the_crd_schemas_cover_every_knative_kind_we_use(crds):
    for key in [("serving.knative.dev/v1", "Service"), ("eventing.knative.dev/v1", "Broker"),
                ("eventing.knative.dev/v1", "Trigger"), ("eventing.knative.dev/v1alpha1", "RabbitmqBrokerConfig"),
                ("sources.knative.dev/v1", "PingSource"), ("sources.knative.dev/v1", "SinkBinding")]:
        assert key in crds


@pytest.mark.parametrize("build", BUILDS)
def test_every_object_is_validated_against_its_schema(rendered, crds, build):
    """Custom resources against the CRD; core kinds with kubernetes-validate --strict.
    An object of any other kind fails: nothing goes out unchecked."""
    report = []
    for obj in rendered[build]:
        key = (obj["apiVersion"], obj["kind"])
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if key in crds:
            report += [f"{name}: {e}" for e in schema_errors(obj, crds[key])]
        elif obj["kind"] in CORE_KINDS:
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                report.append(f"{name}: {exc.message}")
        else:
            report.append(f"{name}: no schema to validate {key} against")
    assert report == []


def test_the_secret_templates_are_valid_secrets():
    docs = [d for d in yaml.safe_load_all((ROOT / "knative" / "secrets.example.yaml").read_text()) if d]
    assert {d["metadata"]["name"] for d in docs} == {"taskforge-secrets", "rabbitmq-connection"}
    for d in docs:
        kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        assert all("REPLACE_ME" in v or k in ("username", "port", "uri") for k, v in d["stringData"].items()), \
            "templates carry placeholders, never real values"
    jwt = next(d for d in docs if d["metadata"]["name"] == "taskforge-secrets")["stringData"]["jwt_secret"]
    assert len(jwt) < 32, "the placeholder must be refused by production-mode settings if applied as is"


def test_strict_validation_rejects_what_the_api_server_would(base, crds):
    """The validators can fail: misplaced and mistyped fields are reported."""
    svc = by_kind(base, "Service")["resize-image"]
    schema = crds[("serving.knative.dev/v1", "Service")]
    bad = copy.deepcopy(svc)
    bad["spec"]["containerConcurrency"] = 2  # belongs on spec.template.spec
    assert any("containerConcurrency" in e for e in schema_errors(bad, schema))
    bad = copy.deepcopy(svc)
    bad["spec"]["template"]["spec"]["timeoutSeconds"] = "600"
    assert schema_errors(bad, schema)
    trig = by_kind(base, "Trigger")["compress-video"]
    bad = copy.deepcopy(trig)
    bad["spec"]["delivery"]["deadLetterSink"]["service"] = "dead-letter"
    assert schema_errors(bad, crds[("eventing.knative.dev/v1", "Trigger")])
    cm = copy.deepcopy(by_kind(base, "ConfigMap")["taskforge-config"])
    cm["spec"] = {"data": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(cm, K8S_VERSION, strict=True)


def test_autoscaling_annotations_sit_on_the_revision_template(base):
    for name, svc in by_kind(base, "Service").items():
        top = svc["metadata"].get("annotations") or {}
        assert not [k for k in top if k.startswith(AUTOSCALING)], f"{name}: autoscaling on the Service is ignored"
        ann = template_annotations(svc)
        assert ann[AUTOSCALING + "class"] == "kpa.autoscaling.knative.dev"
        assert ann[AUTOSCALING + "metric"] == "concurrency"
        for key in ("min-scale", "max-scale", "target"):
            assert ann[AUTOSCALING + key].isdigit(), f"{name}: {key} must be a number in a string"
        assert int(ann[AUTOSCALING + "min-scale"]) <= int(ann[AUTOSCALING + "max-scale"])


def test_workers_and_gateway_scale_to_zero_and_status_stream_stays_up(base):
    services = by_kind(base, "Service")
    for name in CLOUDEVENT_ONLY | {"gateway"}:
        assert template_annotations(services[name])[AUTOSCALING + "min-scale"] == "0", name
    sse = services["status-stream"]["spec"]["template"]
    assert sse["metadata"]["annotations"][AUTOSCALING + "min-scale"] == "1"
    assert sse["spec"]["timeoutSeconds"] == 600  # the default maximum: streams are long
    assert sse["spec"]["containerConcurrency"] == 0  # one async process holds thousands
    assert sse["spec"]["responseStartTimeoutSeconds"] < sse["spec"]["timeoutSeconds"]


def test_prod_keeps_the_dead_letter_sink_up(rendered):
    prod = by_kind(rendered["knative/overlays/prod"], "Service")
    assert template_annotations(prod["dead-letter"])[AUTOSCALING + "min-scale"] == "1"


def test_probes_are_readiness_and_liveness_and_the_root_is_read_only(base):
    # Every function answers GET /readyz (settings accepted, dependencies up) and /healthz
    # (the process answers), CloudEvent workers included; tests/images checks both on the images.
    for name, svc in by_kind(base, "Service").items():
        spec = svc["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", name
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", name
        assert container["ports"] == [{"name": "http1", "containerPort": 8080}]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
        tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
        assert {"name": tmp["name"], "emptyDir": {}} in spec["volumes"], name


def test_concurrency_timeouts_and_resources(base):
    for name, svc in by_kind(base, "Service").items():
        spec = svc["spec"]["template"]["spec"]
        assert 0 < spec["timeoutSeconds"] <= 600, f"{name}: above Knative's default max-revision-timeout"
        assert spec["responseStartTimeoutSeconds"] <= spec["timeoutSeconds"]
        (c,) = spec["containers"]
        assert set(c["resources"]) == {"requests", "limits"} and all(
            set(c["resources"][k]) == {"cpu", "memory"} for k in ("requests", "limits")), name
        if spec["containerConcurrency"]:
            env = {e["name"]: e["value"] for e in c.get("env", [])}
            served = int(env.get("WORKERS", "1")) * int(env["THREADS"])
            assert served == spec["containerConcurrency"], f"{name}: gunicorn workers x threads != containerConcurrency"
            assert template_annotations(svc)[AUTOSCALING + "target"] == str(spec["containerConcurrency"])


def test_delivery_timeouts_cover_a_cold_start_plus_the_longest_job(base):
    """Retrying a job that is still running would run it twice: each worker trigger's
    timeout exceeds the job's own cap (from the ConfigMap) plus a cold start."""
    cold_start_s = 30.0
    cfg = by_kind(base, "ConfigMap")["taskforge-config"]["data"]
    caps = {"compress-video": float(cfg["TASKFORGE_VIDEO_TIMEOUT_S"]),
            # the render's cap covers loading the page (wkhtmltopdf or Chromium fetch it)
            "generate-pdf": float(cfg["TASKFORGE_PDF_TIMEOUT_S"]),
            "resize-image": float(cfg["TASKFORGE_FETCH_TIMEOUT_S"])}
    triggers = by_kind(base, "Trigger")
    for name, cap in caps.items():
        timeout = parse_duration(triggers[name]["spec"]["delivery"]["timeout"])
        assert timeout > cap + cold_start_s, f"{name}: {timeout} s <= {cap} s job + {cold_start_s} s cold start"


def test_max_attempts_matches_the_task_triggers(base):
    cfg = by_kind(base, "ConfigMap")["taskforge-config"]["data"]
    for name in ("resize-image", "compress-video", "generate-pdf"):
        retry = by_kind(base, "Trigger")[name]["spec"]["delivery"]["retry"]
        assert int(cfg["TASKFORGE_MAX_ATTEMPTS"]) == retry + 1, name


def test_rabbitmq_holds_a_whole_retry_chain():
    """eventing-rabbitmq retries inline while the message stays unacked: the longest
    chain must fit RabbitMQ's consumer_timeout (set in infra/rabbitmq/rabbitmq.conf,
    which the README asks cluster operators to match)."""
    conf = (ROOT / "infra" / "rabbitmq" / "rabbitmq.conf").read_text()
    timeout_ms = next(int(line.split("=")[1]) for line in conf.splitlines()
                      if line.strip().startswith("consumer_timeout"))
    worst = max(t.delivery.worst_case_hold_s() for t in load_config().triggers.values())
    assert worst < 0.9 * timeout_ms / 1000, f"worst hold {worst:.0f} s vs consumer_timeout {timeout_ms} ms"


def test_broker_is_the_rabbitmq_class_with_an_external_cluster(base):
    (broker,) = by_kind(base, "Broker").values()
    assert broker["metadata"]["annotations"]["eventing.knative.dev/broker.class"] == "RabbitMQBroker"
    ref = broker["spec"]["config"]
    cfg = by_kind(base, "RabbitmqBrokerConfig")[ref["name"]]
    assert (ref["apiVersion"], ref["kind"]) == (cfg["apiVersion"], cfg["kind"])
    assert cfg["spec"]["rabbitmqClusterReference"] == {"connectionSecret": {"name": "rabbitmq-connection"}}
    assert "kind: RabbitmqCluster" in (ROOT / "knative" / "base" / "rabbitmq.yaml").read_text()
    for trig in by_kind(base, "Trigger").values():
        assert trig["spec"]["broker"] == broker["metadata"]["name"]


def test_ping_source_and_sink_binding_target_the_broker(base):
    (broker,) = by_kind(base, "Broker")
    (ping,) = by_kind(base, "PingSource").values()
    assert ping["spec"]["sink"]["ref"] == {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "name": broker}
    assert parse_duration("PT60S") == 60 and ping["spec"]["schedule"].count(" ") == 4  # minute granularity
    (binding,) = by_kind(base, "SinkBinding").values()
    assert binding["spec"]["sink"]["ref"]["name"] == broker
    selector = binding["spec"]["subject"]["selector"]["matchLabels"]
    producers = {n for n, s in by_kind(base, "Service").items()
                 if all(s["metadata"].get("labels", {}).get(k) == v for k, v in selector.items())}
    assert producers == {"gateway", "outbox-sweeper"}


def test_secrets_are_files_and_every_setting_exists(base):
    known = {f"TASKFORGE_{f.name.upper()}" for f in fields(Settings)}
    cfg = by_kind(base, "ConfigMap")["taskforge-config"]["data"]
    for key, value in cfg.items():
        if key.startswith("TASKFORGE_"):
            assert key.removesuffix("_FILE") in known, f"{key} is not a setting (shared/settings.py)"
        if key.endswith("_FILE"):
            assert value.startswith("/etc/taskforge/secrets/"), key
    for secret in ("DATABASE_URL", "REDIS_URL", "AMQP_URL", "JWT_SECRET"):
        assert f"TASKFORGE_{secret}" not in cfg, "secrets never sit in a ConfigMap"
        assert f"TASKFORGE_{secret}_FILE" in cfg
    workloads = [s["spec"]["template"]["spec"] for s in by_kind(base, "Service").values()]
    workloads.append(by_kind(base, "Job")["taskforge-migrate"]["spec"]["template"]["spec"])
    for spec in workloads:
        (c,) = spec["containers"]
        assert {"name": "secrets", "mountPath": "/etc/taskforge/secrets", "readOnly": True} in c["volumeMounts"]
        assert {"name": "secrets", "secret": {"secretName": "taskforge-secrets"}} in spec["volumes"]
        assert c["envFrom"] == [{"configMapRef": {"name": "taskforge-config"}}]
        assert spec["automountServiceAccountToken"] is False


def test_containers_run_unprivileged(base):
    for name, svc in by_kind(base, "Service").items():
        (c,) = svc["spec"]["template"]["spec"]["containers"]
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] and sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"] == {"drop": ["ALL"]}


def test_internal_functions_are_cluster_local_where_deliveries_cannot_be_signed(rendered):
    """Knative's broker cannot sign its deliveries, so the signature check is off there;
    what keeps the internal functions closed is that only the cluster can reach them."""
    for build in ("knative/base", "knative/overlays/dev", "knative/overlays/prod"):
        objs = rendered[build]
        assert by_kind(objs, "ConfigMap")["taskforge-config"]["data"]["TASKFORGE_DELIVERY_AUTH"] == "none"
        for name, svc in by_kind(objs, "Service").items():
            visibility = svc["metadata"].get("labels", {}).get("networking.knative.dev/visibility")
            if name in CLOUDEVENT_ONLY:
                assert visibility == "cluster-local", (build, name)
            else:  # the gateway and the status stream are the public doors
                assert visibility is None, (build, name)


def test_migration_job(base, rendered):
    job = by_kind(base, "Job")["taskforge-migrate"]
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["taskforge", "migrate"]
    assert c["image"].split(":")[0] == "taskforge/gateway"
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("OnFailure", "Never")
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    prod_job = by_kind(rendered["knative/overlays/prod"], "Job")["taskforge-migrate"]
    assert prod_job["spec"]["template"]["spec"]["containers"][0]["image"] == "taskforge/gateway:0.1.0"


def test_images_are_named_after_functions_and_pinned_in_prod(rendered):
    for build in BUILDS:
        for name, svc in by_kind(rendered[build], "Service").items():
            image = svc["spec"]["template"]["spec"]["containers"][0]["image"]
            assert image.split(":")[0] == f"taskforge/{name}", (build, image)
            if build.endswith("prod"):
                assert image == f"taskforge/{name}:0.1.0"


def test_dev_overlay_is_self_contained(rendered):
    dev = rendered["knative/overlays/dev"]
    assert {o["metadata"].get("namespace") for o in dev if o["kind"] != "Namespace"} == {"taskforge-dev"}
    assert set(by_kind(dev, "Namespace")) == {"taskforge-dev"}
    secrets = by_kind(dev, "Secret")
    assert set(secrets) == {"taskforge-secrets", "rabbitmq-connection"}
    assert set(secrets["taskforge-secrets"]["data"]) == {"database_url", "redis_url", "amqp_url", "jwt_secret",
                                                         "aws_credentials", "webhook_encryption_key"}
    assert by_kind(dev, "ConfigMap")["taskforge-config"]["data"]["TASKFORGE_ENV"] == "dev"
    assert by_kind(dev, "RabbitmqBrokerConfig")["taskforge-rabbitmq"]["spec"]["queueType"] == "classic"
    assert not by_kind(rendered["knative/overlays/prod"], "Secret"), "prod never ships secrets"
