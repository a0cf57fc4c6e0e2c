"""infra/docker-compose.yml, checked structurally (no container engine runs here):
the services the issue lists, a healthcheck on each long-running one, data services on
loopback at the ports `make dev`'s defaults expect, config files that exist where the
commands look for them."""
from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from shared.settings import Settings
from tests.deploy.k8s import ROOT

INFRA = ROOT / "infra"
COMPOSE: dict[str, Any] = yaml.safe_load((INFRA / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES: dict[str, Any] = COMPOSE["services"]
REQUIRED = {"postgres", "rabbitmq", "redis", "minio", "prometheus", "grafana", "alertmanager", "loki", "promtail"}
RUNTIME_DIRS = {"../var/log"}  # created by the user before shipping logs (README)


def long_running() -> list[str]:
    return [n for n, s in SERVICES.items() if s.get("restart") != "no"]


def test_top_level_keys_and_required_services():
    assert set(COMPOSE) <= {"name", "services", "volumes", "networks", "configs", "secrets"}
    assert "version" not in COMPOSE  # obsolete in the Compose specification
    assert REQUIRED <= set(SERVICES)
    for name, svc in SERVICES.items():
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", svc["image"]), f"{name}: image with an explicit tag"


@pytest.mark.parametrize("name", long_running())
def test_every_long_running_service_has_a_healthcheck(name):
    hc = SERVICES[name].get("healthcheck")
    assert hc, f"{name}: no healthcheck"
    assert hc["test"][0] in ("CMD", "CMD-SHELL") and len(hc["test"]) >= 2
    for key in ("interval", "timeout"):
        assert re.fullmatch(r"\d+(ms|s|m)", hc[key]), f"{name}: {key}"
    assert isinstance(hc["retries"], int) and hc["retries"] > 0
    assert SERVICES[name].get("restart") == "unless-stopped"


def test_dependencies_name_existing_services_and_wait_for_health():
    for name, svc in SERVICES.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in SERVICES, f"{name} depends on unknown {dep}"
            assert cond["condition"] in ("service_healthy", "service_started", "service_completed_successfully")
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep}'s health, which has no check"


def test_published_ports_stay_on_loopback_and_match_the_settings_defaults():
    published = {}
    for name, svc in SERVICES.items():
        if svc.get("network_mode") == "host":
            assert "ports" not in svc, f"{name}: host networking publishes nothing"
            continue
        for spec in svc.get("ports", []):
            host_ip, host_port, container_port = str(spec).split(":")
            assert host_ip == "127.0.0.1", f"{name}: {spec} would listen beyond this machine"
            published[int(host_port)] = name
    defaults = Settings()
    for url, service in ((defaults.database_url, "postgres"), (defaults.redis_url, "redis"),
                         (defaults.amqp_url, "rabbitmq")):
        parts = urlsplit(url)
        assert parts.hostname == "127.0.0.1" and published.get(parts.port) == service, url


def test_host_network_services_listen_on_loopback():
    """They share the host's network to reach `make dev`; they must not listen beyond it."""
    listen = {"prometheus": "--web.listen-address=127.0.0.1:9090",
              "alertmanager": "--web.listen-address=127.0.0.1:9093"}
    for name, flag in listen.items():
        assert flag in SERVICES[name]["command"]
    assert SERVICES["grafana"]["environment"]["GF_SERVER_HTTP_ADDR"] == "127.0.0.1"
    loki = yaml.safe_load((INFRA / "loki" / "loki.yml").read_text())
    assert loki["server"]["http_listen_address"] == "127.0.0.1"
    promtail = yaml.safe_load((INFRA / "promtail" / "promtail.yml").read_text())
    assert promtail["server"]["http_listen_address"] == "127.0.0.1"
    assert promtail["clients"][0]["url"].startswith("http://127.0.0.1:3100/")


def _mounts(name: str) -> dict[str, str]:
    """container path -> host path (relative to infra/) of the service's bind mounts."""
    out = {}
    for spec in SERVICES[name].get("volumes", []):
        host, container = spec.split(":")[:2]
        if host.startswith((".", "/")):
            out[container] = host
    return out


def test_bind_mounts_exist_and_named_volumes_are_declared():
    for name, svc in SERVICES.items():
        for spec in svc.get("volumes", []):
            host = spec.split(":")[0]
            if host.startswith((".", "/")):
                assert host in RUNTIME_DIRS or (INFRA / host).exists(), f"{name}: {host} does not exist"
            else:
                assert host in (COMPOSE.get("volumes") or {}), f"{name}: volume {host} is not declared"


def _host_file(name: str, container_path: str) -> str:
    """The host file (relative to infra/) a container path resolves to through the mounts."""
    for target, host in sorted(_mounts(name).items(), key=lambda kv: -len(kv[0])):
        if container_path == target or container_path.startswith(target + "/"):
            return str(PurePosixPath(host) / PurePosixPath(container_path).relative_to(target))
    raise AssertionError(f"{name}: nothing mounted at {container_path}")


@pytest.mark.parametrize(("name", "flag"), [("prometheus", "--config.file="), ("alertmanager", "--config.file="),
                                            ("loki", "-config.file="), ("promtail", "-config.file=")])
def test_each_tool_finds_its_config_file(name, flag):
    (arg,) = [a for a in SERVICES[name]["command"] if a.startswith(flag)]
    host = _host_file(name, arg.removeprefix(flag))
    assert (INFRA / host).is_file(), f"{name}: {host}"


def test_grafana_is_provisioned_with_data_sources_and_the_dashboard():
    prov = _host_file("grafana", "/etc/grafana/provisioning/datasources/datasources.yml")
    assert (INFRA / prov).is_file()
    providers = yaml.safe_load((INFRA / _host_file("grafana", "/etc/grafana/provisioning/dashboards/dashboards.yml"))
                               .read_text())
    path = providers["providers"][0]["options"]["path"]
    assert (INFRA / _host_file("grafana", path + "/taskforge.json")).is_file()
    home = SERVICES["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (INFRA / _host_file("grafana", home)).is_file()


def test_rabbitmq_gets_the_plugins_and_the_long_consumer_timeout():
    mounts = _mounts("rabbitmq")
    assert (INFRA / mounts["/etc/rabbitmq/enabled_plugins"]).read_text().strip() == \
        "[rabbitmq_management,rabbitmq_prometheus]."
    conf = (INFRA / mounts["/etc/rabbitmq/conf.d/90-taskforge.conf"]).read_text()
    assert re.search(r"^consumer_timeout = \d+$", conf, re.M)


def test_promtail_reads_the_log_directory_it_is_given():
    promtail = yaml.safe_load((INFRA / "promtail" / "promtail.yml").read_text())
    path = promtail["scrape_configs"][0]["static_configs"][0]["labels"]["__path__"]
    assert _host_file("promtail", str(PurePosixPath(path).parent)) == "../var/log"
