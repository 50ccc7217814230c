from __future__ import annotations

import pytest
from pydantic import ValidationError

from cli.main import main
from posflow.settings import Settings


def test_nested_settings_come_from_posflow_prefixed_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POSFLOW_KAFKA__PORT", "9092")
    monkeypatch.setenv("POSFLOW_POSTGRES__PASSWORD", "s3cret")
    settings = Settings()
    assert settings.kafka.bootstrap == "127.0.0.1:9092"
    assert "s3cret" in settings.postgres.dsn()
    # Secrets never show in a printed configuration.
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings.model_dump())


def test_out_of_range_port_is_rejected_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="port"):
        Settings.model_validate({"kafka": {"port": 70000}})


def test_cli_reports_a_bad_setting_in_one_line_with_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("POSFLOW_KAFKA__PORT", "not-a-port")
    assert main(["stack", "status"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("posflow: error: invalid setting POSFLOW_KAFKA__PORT")
    assert "unset the environment variable POSFLOW_KAFKA__PORT" in err[0]


def test_cli_unknown_service_names_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stack", "logs", "zookeeper"]) == 1
    err = capsys.readouterr().err
    assert "unknown stack service 'zookeeper'" in err
    assert "postgres, kafka, mosquitto, prometheus" in err
