"""Settings: defaults, YAML file, environment, validation messages."""

from __future__ import annotations

import pytest

from atelier.generation.app import Settings as GenerationSettings
from atelier.kit.settings import ConfigError, ServiceSettings, load_settings
from atelier.training.app import Settings as TrainingSettings


def test_defaults_are_valid_and_per_service():
    gen = load_settings(GenerationSettings)
    assert gen.grpc.port == 50052 and gen.metrics.port == 9092
    assert gen.grpc.max_message_bytes == 64 * 1024 * 1024
    assert gen.storage.backend == "local"
    assert load_settings(TrainingSettings).grpc.port == 50051


def test_yaml_then_env_precedence(tmp_path, monkeypatch):
    config = tmp_path / "atelier.yaml"
    config.write_text(
        "grpc:\n  host: 0.0.0.0\n  shutdown_grace_s: 5\n"
        "generation:\n  base_models: {sd15: 'store://base/sd15'}\n  default_model: sd15\n"
    )
    monkeypatch.setenv("ATELIER_GRPC__SHUTDOWN_GRACE_S", "12.5")
    monkeypatch.setenv("ATELIER_LOGGING__LEVEL", "DEBUG")
    settings = load_settings(GenerationSettings, config)
    assert settings.grpc.host == "0.0.0.0"  # from the file
    assert settings.grpc.shutdown_grace_s == 12.5  # env beats the file
    assert settings.grpc.port == 50052  # a partial section keeps the service's port
    assert settings.logging.level == "DEBUG"
    assert settings.generation.base_models == {"sd15": "store://base/sd15"}
    assert settings.generation.default_model == "sd15"
    monkeypatch.setenv("ATELIER_CONFIG_FILE", str(config))
    assert load_settings(GenerationSettings).grpc.host == "0.0.0.0"


def test_invalid_setting_names_field_and_env_var(monkeypatch):
    monkeypatch.setenv("ATELIER_GRPC__PORT", "70000")
    with pytest.raises(ConfigError) as err:
        load_settings(GenerationSettings)
    message = str(err.value)
    assert "grpc.port" in message and "ATELIER_GRPC__PORT" in message and "70000" in message


def test_unknown_setting_in_file_is_refused(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("grpc:\n  prot: 1\n")
    with pytest.raises(ConfigError, match=r"grpc\.prot"):
        load_settings(GenerationSettings, config)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(ServiceSettings, tmp_path / "nope.yaml")


def test_consistency_rules(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="cert_file and key_file"):
        load_settings(ServiceSettings, tls={"cert_file": __file__})
    with pytest.raises(ConfigError, match="require_client_cert needs client_ca_file"):
        load_settings(ServiceSettings, tls={"require_client_cert": True})
    monkeypatch.setenv("ATELIER_STORAGE__BACKEND", "minio")
    with pytest.raises(ConfigError) as err:
        load_settings(ServiceSettings)
    assert "access_key and secret_key" in str(err.value)
    monkeypatch.setenv("ATELIER_STORAGE__SECRET_KEY", "s3cr3t-value")
    monkeypatch.setenv("ATELIER_STORAGE__ACCESS_KEY", "")
    with pytest.raises(ConfigError) as err:
        load_settings(ServiceSettings)
    assert "s3cr3t-value" not in str(err.value)


def test_server_cli_exits_2_on_bad_config(monkeypatch, capsys):
    from atelier.serve import main

    monkeypatch.setenv("ATELIER_METRICS__PORT", "not-a-port")
    assert main(["generation"]) == 2
    assert "metrics.port" in capsys.readouterr().err
