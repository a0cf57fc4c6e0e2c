"""Observability (docs/architecture.md §9): Prometheus config and alert rules checked by the real
promtool, Alertmanager's by amtool, alert scenarios run with `promtool test rules`;
every query of the rules and the Grafana dashboard uses a metric (and labels) the
code really exports; log queries use labels the shipper sets; JSON logs carry
task_id/event_id/trace_id."""
from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families
from prometheus_flask_exporter import PrometheusMetrics

from infra.runtime.config import load_config
from shared import metrics as tf_metrics
from shared.logging import JsonFormatter, bind
from tests.deploy import promql
from tests.deploy.k8s import ROOT

PROM = ROOT / "infra" / "prometheus"
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "taskforge.json"
PROMETHEUS_OWN: dict[str, set[str]] = {"up": set()}  # series Prometheus itself produces, with their labels
ALWAYS = {"job", "instance"}  # target labels every scraped series has


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed (Debian package {package}; .ci/run installs it)", pytrace=False)
    return path


def run(*cmd: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


# --- Prometheus and Alertmanager with their own tools -------------------------------------

def test_promtool_checks_the_alert_rules():
    rules = sorted(str(p) for p in (PROM / "rules").glob("*.yml"))
    assert rules
    proc = run(tool("promtool", "prometheus"), "check", "rules", *rules)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_runs_the_alert_scenarios():
    proc = run(tool("promtool", "prometheus"), "test", "rules", str(PROM / "tests" / "taskforge_test.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_checks_the_local_scrape_config():
    proc = run(tool("promtool", "prometheus"), "check", "config", str(PROM / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_checks_the_kubernetes_scrape_config(tmp_path):
    """Checked by promtool as is; Debian builds Prometheus without Kubernetes discovery,
    so there the discovery blocks are swapped for static ones and everything else
    (relabelling, rules, alerting) is still checked by the real tool."""
    promtool = tool("promtool", "prometheus")
    src = PROM / "prometheus-kubernetes.yml"
    proc = run(promtool, "check", "config", str(src))
    if proc.returncode != 0 and "kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        doc = yaml.safe_load(src.read_text())
        for job in doc["scrape_configs"]:
            for sd in job.pop("kubernetes_sd_configs", []):
                assert sd["role"] == "pod" and sd["namespaces"]["names"], job["job_name"]
                job.setdefault("static_configs", []).append({"targets": ["127.0.0.1:8080"]})
        copy = tmp_path / "prometheus-kubernetes.yml"
        copy.write_text(yaml.safe_dump(doc))
        (tmp_path / "rules").symlink_to(PROM / "rules")
        proc = run(promtool, "check", "config", str(copy))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_amtool_checks_the_alertmanager_config():
    proc = run(tool("amtool", "prometheus-alertmanager"), "check-config",
               str(ROOT / "infra" / "alertmanager" / "alertmanager.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_local_scrape_config_has_a_job_per_function_on_its_port():
    graph = load_config()
    jobs = {j["job_name"]: j for j in yaml.safe_load((PROM / "prometheus.yml").read_text())["scrape_configs"]}
    for name, f in graph.functions.items():
        assert jobs[name]["static_configs"] == [{"targets": [f"127.0.0.1:{f.port}"]}], name
    assert jobs["dispatcher"]["static_configs"] == [{"targets": [f"127.0.0.1:{graph.broker.ingress_port}"]}]
    assert "rabbitmq" in jobs


def test_kubernetes_scrape_config_names_jobs_after_functions():
    doc = yaml.safe_load((PROM / "prometheus-kubernetes.yml").read_text())
    sources = {}
    for job in doc["scrape_configs"]:
        for r in job.get("relabel_configs", []):
            if r.get("target_label") == "job":
                sources[job["job_name"]] = r["source_labels"]
    assert sources == {"taskforge-knative": ["__meta_kubernetes_pod_label_serving_knative_dev_service"],
                       "taskforge-openfaas": ["__meta_kubernetes_pod_label_faas_function"]}
    assert {j["job_name"] for j in doc["scrape_configs"]} >= {"dispatcher", "rabbitmq"}
    assert doc["rule_files"] == yaml.safe_load((PROM / "prometheus.yml").read_text())["rule_files"]


# --- metric names and labels the code exports ------------------------------------------------

@dataclass
class Exported:
    labels: dict[str, set[str]] = field(default_factory=dict)  # sample name -> label names

    def add(self, family: str, kind: str, labels: set[str]) -> None:
        suffixes = {"counter": ["_total", "_created"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count",
                    "_created"], "summary": ["", "_sum", "_count", "_created"], "info": ["_info"]}.get(kind, [""])
        for s in suffixes:
            self.labels.setdefault(family + s, set()).update(labels | ({"le"} if s == "_bucket" else set()))


def _family_base(name: str, kind: str) -> str:
    return name.removesuffix("_total") if kind == "counter" else name


@pytest.fixture(scope="module")
def exported(base_settings) -> Exported:
    """What a real gateway process exports on /metrics (the shared metric catalogue and
    the Flask exporter's HTTP metrics), with label names from their definitions."""
    from functions.gateway.app import create_app

    client = create_app(base_settings).test_client()
    assert client.get("/openapi.json").status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    out = Exported()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    # The text format lists `<name>_created` as a family of its own; add() covers it.
    families = {n: k for n, k in families.items() if not (n.endswith("_created") and n[:-8] in families)}
    declared = {}
    for obj in vars(tf_metrics).values():
        if isinstance(obj, MetricWrapperBase):
            (desc,) = obj.describe()
            declared[_family_base(desc.name, desc.type)] = set(obj._labelnames)
    # Label names of the Flask exporter's metrics, configured as the gateway does.
    registry = CollectorRegistry()
    replica = Flask("replica")
    replica.add_url_rule("/x/<item>", "x", lambda item: "ok")
    PrometheusMetrics(replica, registry=registry, group_by="url_rule")
    replica.test_client().get("/x/1")
    flask_labels: dict[str, set[str]] = {}
    for fam in registry.collect():
        for sample in fam.samples:
            flask_labels.setdefault(fam.name, set()).update(set(sample.labels) - {"le"})
    for name, kind in families.items():
        if name.startswith("taskforge_"):
            assert name in declared, f"{name} is exported but not declared in shared/metrics.py"
            out.add(name, kind, declared[name])
        elif name.startswith("flask_"):
            out.add(name, kind, flask_labels.get(name, set()))
    missing = set(declared) - set(families)
    assert not missing, f"declared in shared/metrics.py but not exported by the gateway process: {missing}"
    for name, labels in PROMETHEUS_OWN.items():
        out.labels[name] = set(labels)
    return out


def _queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every alert rule and every Prometheus query of the dashboard."""
    out = []
    for path in sorted((PROM / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append((f"{path.name}:{rule.get('alert') or rule.get('record')}", rule["expr"]))
    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        if panel.get("datasource", {}).get("type") == "prometheus":
            for t in panel.get("targets", []):
                out.append((f"panel {panel['title']!r}", t["expr"]))
    for var in dash["templating"]["list"]:
        if var.get("datasource", {}).get("type") == "prometheus":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", q)
            assert m, f"variable {var['name']}: unexpected query {q!r}"
            out.append((f"variable {var['name']!r}", f'{m[1]}{{{m[2]}=~".+"}}'))
    return out


def unknown_series(expr: str, exported: Exported) -> list[str]:
    """Every metric or label the expression uses that the code does not export."""
    problems = []
    names = set()
    for name, matchers in promql.selectors(expr):
        if name not in exported.labels:
            problems.append(f"metric {name!r} is not exported")
            continue
        names.add(name)
        extra = set(matchers) - exported.labels[name] - ALWAYS
        if extra:
            problems.append(f"{name} has no label(s) {sorted(extra)}")
    allowed = set().union(ALWAYS, *(exported.labels[n] for n in names))
    extra = promql.grouping_labels(expr) - allowed
    if extra and names:
        problems.append(f"grouping by label(s) {sorted(extra)} that {sorted(names)} do not carry")
    return problems


def test_every_query_uses_exported_metrics_and_labels(exported):
    report = [f"{where}: {p}" for where, expr in _queries() for p in unknown_series(expr, exported)]
    assert report == []


def test_the_dashboard_and_rules_cover_the_catalogue(exported):
    """Every custom metric appears in at least one query (no blind spots)."""
    used = set().union(*(promql.metric_names(expr) for _, expr in _queries()))
    families = {_family_base(d.name, d.type) for m in vars(tf_metrics).values()
                if isinstance(m, MetricWrapperBase) for d in m.describe()}
    unused = {f for f in families if not any(u.startswith(f) for u in used)}
    assert unused == set()


@pytest.mark.parametrize(("expr", "expected"), [
    ("sum(rate(taskforge_task_submitted_total[5m]))", "metric 'taskforge_task_submitted_total' is not exported"),
    ('taskforge_tasks_completed_total{outcome="failed", kind="x"}', "has no label(s) ['kind']"),
    ("sum by (trigger) (rate(taskforge_dead_letters_total[5m]))", "grouping by label(s) ['trigger']"),
    ("rate(flask_http_requests_total[1m])", "metric 'flask_http_requests_total' is not exported"),
])
def test_the_name_check_can_fail(exported, expr, expected):
    assert any(expected in p for p in unknown_series(expr, exported)), unknown_series(expr, exported)


def test_custom_metrics_in_use_are_set_by_the_code():
    """A gauge nobody sets would make its alert silently dead."""
    used = set().union(*(promql.metric_names(expr) for _, expr in _queries()))
    sources = [p.read_text(encoding="utf-8") for d in ("shared", "functions", "infra")
               for p in (ROOT / d).rglob("*.py") if p.name != "metrics.py"]
    for attr, obj in vars(tf_metrics).items():
        if not isinstance(obj, MetricWrapperBase):
            continue
        (desc,) = obj.describe()
        base = _family_base(desc.name, desc.type)
        if any(u.startswith(base) for u in used):
            pattern = re.compile(rf"\b{attr}\b\s*(\.labels\(|\.(inc|dec|set|observe)\()")
            assert any(pattern.search(src) for src in sources), f"{attr} ({desc.name}) is never set"


# --- Grafana --------------------------------------------------------------------------

def test_dashboard_is_well_formed_and_uses_provisioned_data_sources():
    dash = json.loads(DASHBOARD.read_text())
    sources = yaml.safe_load((ROOT / "infra/grafana/provisioning/datasources/datasources.yml").read_text())
    uids = {d["uid"]: d["type"] for d in sources["datasources"]}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] and dash["title"] == "TaskForge"
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        ds = p["datasource"]
        assert uids.get(ds["uid"]) == ds["type"], p["title"]
        assert p["targets"] and all(t["refId"] and t["expr"] for t in p["targets"]), p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    providers = yaml.safe_load((ROOT / "infra/grafana/provisioning/dashboards/dashboards.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def test_log_queries_use_what_promtail_ships():
    cfg = yaml.safe_load((ROOT / "infra/promtail/promtail.yml").read_text())
    (job,) = cfg["scrape_configs"]
    stages = {k: v for s in job["pipeline_stages"] for k, v in s.items()}
    labels = set(job["static_configs"][0]["labels"]) - {"__path__"} | set(stages["labels"])
    metadata = set(stages["structured_metadata"])
    assert set(stages["json"]["expressions"]) >= labels - {"job"} | metadata
    assert metadata == {"task_id", "event_id", "trace_id"}
    dash = json.loads(DASHBOARD.read_text())
    loki = [t["expr"] for p in dash["panels"] if p.get("datasource", {}).get("type") == "loki" for t in p["targets"]]
    assert loki
    for expr in loki:
        selector, _, pipeline = expr.partition("}")
        assert {m[0] for m in promql._MATCHER.findall(selector + "}")} <= labels, expr
        assert set(re.findall(r"\|\s*(\w+)\s*=", pipeline)) <= metadata, expr


# --- logs and health gauges -------------------------------------------------------------------

def test_json_log_lines_carry_task_event_and_trace_ids():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tests.deploy.json")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        with bind(task_id="t-1", event_id="e-1", trace_id="0af7651916cd43dd8448eb211c80319c"):
            log.info("working")
        log.info("outside")
    finally:
        log.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["task_id"] == "t-1" and inside["event_id"] == "e-1"
    assert inside["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert inside["level"] == "info" and inside["msg"] == "working" and inside["ts"].endswith("Z")
    assert "task_id" not in outside


def test_stale_running_gauge_counts_tasks_whose_lease_expired(settings, conn):
    from shared.tasks.health import refresh_stale_running

    user = conn.execute("INSERT INTO users (email, password_hash) VALUES ('gauge@example.com', 'x') RETURNING id")
    uid = user.fetchone()["id"]
    for lease in ("now() - interval '5 minutes'", "now() + interval '5 minutes'"):
        conn.execute(f"INSERT INTO tasks (user_id, type, status, payload, lease_owner, lease_until)"
                     f" VALUES (%s, 'resize-image', 'running', '{{}}', 'w', {lease})", (uid,))
    conn.execute("INSERT INTO tasks (user_id, type, status, payload) VALUES (%s, 'resize-image', 'queued', '{}')",
                 (uid,))
    assert refresh_stale_running(conn) == 1
    assert tf_metrics.TASKS_STALE_RUNNING._value.get() == 1
    assert refresh_stale_running(conn, grace_s=600) == 0
