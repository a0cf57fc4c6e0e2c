"""Settings: read from TASKFORGE_* variables and *_FILE secrets; production refuses defaults."""
import pytest

from shared.settings import SettingsError, load_settings, redacted


def test_reads_typed_values_from_environment():
    s = load_settings({"TASKFORGE_DB_POOL_MAX": "7", "TASKFORGE_EAGER_RELAY": "false",
                       "TASKFORGE_FETCH_ALLOW_CIDRS": "127.0.0.0/8, ::1/128", "TASKFORGE_FETCH_TIMEOUT_S": "2.5"})
    assert s.db_pool_max == 7
    assert s.eager_relay is False
    assert s.fetch_allow_cidrs == ("127.0.0.0/8", "::1/128")
    assert s.fetch_timeout_s == 2.5


def test_secret_from_file(tmp_path):
    f = tmp_path / "jwt"
    f.write_text("s" * 40 + "\n")
    s = load_settings({"TASKFORGE_JWT_SECRET_FILE": str(f)})
    assert s.jwt_secret == "s" * 40


def test_unreadable_value_is_a_clear_error():
    with pytest.raises(SettingsError, match="TASKFORGE_DB_POOL_MAX"):
        load_settings({"TASKFORGE_DB_POOL_MAX": "many"})


def test_a_keepalive_below_one_second_is_refused():
    assert load_settings({"TASKFORGE_HTTP_KEEPALIVE_S": "30"}).http_keepalive_s == 30
    for bad in ("0", "-5"):
        with pytest.raises(SettingsError, match="TASKFORGE_HTTP_KEEPALIVE_S"):
            load_settings({"TASKFORGE_HTTP_KEEPALIVE_S": bad})


def test_production_refuses_default_secrets():
    with pytest.raises(SettingsError, match="JWT_SECRET"):
        load_settings({"TASKFORGE_ENV": "production", "TASKFORGE_AMQP_URL": "amqp://u:p@mq/"})
    with pytest.raises(SettingsError, match="guest"):
        load_settings({"TASKFORGE_ENV": "production", "TASKFORGE_JWT_SECRET": "x" * 40})
    with pytest.raises(SettingsError, match="DELIVERY_SECRET"):
        load_settings({"TASKFORGE_ENV": "production", "TASKFORGE_JWT_SECRET": "x" * 40,
                       "TASKFORGE_AMQP_URL": "amqp://u:p@mq/"})
    s = load_settings({"TASKFORGE_ENV": "production", "TASKFORGE_JWT_SECRET": "x" * 40,
                       "TASKFORGE_AMQP_URL": "amqp://u:p@mq/", "TASKFORGE_DELIVERY_SECRET": "d" * 40})
    assert s.production and s.delivery_secret == "d" * 40
    # Knative: the broker cannot sign; internal services are cluster-local instead
    assert not load_settings({"TASKFORGE_ENV": "production", "TASKFORGE_JWT_SECRET": "x" * 40,
                              "TASKFORGE_AMQP_URL": "amqp://u:p@mq/", "TASKFORGE_DELIVERY_AUTH": "none"}).delivery_secret
    with pytest.raises(SettingsError, match="DELIVERY_AUTH"):
        load_settings({"TASKFORGE_DELIVERY_AUTH": "signature"})


def test_settings_are_frozen_and_redacted():
    s = load_settings({"TASKFORGE_JWT_SECRET": "topsecret" * 5})
    with pytest.raises(AttributeError):
        s.env = "x"  # type: ignore[misc]
    assert redacted(s)["jwt_secret"] == "***"


def test_knative_sink_variable_is_honoured():
    assert load_settings({"K_SINK": "http://broker-ingress/"}).k_sink == "http://broker-ingress/"
