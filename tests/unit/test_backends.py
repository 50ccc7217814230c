"""Which backend the tests' services come from, and why (tests/backends.py)."""

from __future__ import annotations

import pytest

from tests.backends import Choice, Engine, choose_backend, probe_engine

UP = Engine("unix:///var/run/docker.sock", answers=True)
DOWN = Engine("unix:///var/run/docker.sock", answers=False, detail="No such file or directory")


def test_unset_or_stack_is_the_local_stack_whatever_docker_says() -> None:
    for requested in (None, "", "stack", " Stack "):
        for engine in (UP, DOWN):
            assert choose_backend(requested, engine, installed=True).backend == "stack"


def test_testcontainers_is_used_where_an_engine_answers_and_the_package_is_there() -> None:
    for requested in ("testcontainers", "auto"):
        choice = choose_backend(requested, UP, installed=True)
        assert choice == Choice(
            "testcontainers",
            "Kafka, TimescaleDB and Mosquitto from unix:///var/run/docker.sock",
        )


def test_testcontainers_without_an_engine_skips_and_names_what_is_missing() -> None:
    choice = choose_backend("testcontainers", DOWN, installed=True)
    assert choice.backend is None
    assert choice.reason == (
        "POSFLOW_TEST_BACKEND=testcontainers but no Docker engine answers at "
        "unix:///var/run/docker.sock (No such file or directory)"
    )
    choice = choose_backend("testcontainers", DOWN, installed=False)
    assert choice.backend is None
    assert "no Docker engine answers" in choice.reason
    assert "the testcontainers package is not installed (pip install -e '.[dev]')" in (
        choice.reason
    )
    assert choose_backend("testcontainers", UP, installed=False).backend is None


def test_auto_falls_back_to_the_local_stack_and_says_why() -> None:
    choice = choose_backend("auto", DOWN, installed=True)
    assert choice.backend == "stack"
    assert choice.reason == (
        "the local stack (POSFLOW_TEST_BACKEND=auto: no Docker engine answers at "
        "unix:///var/run/docker.sock (No such file or directory))"
    )


def test_an_unknown_value_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"expected one of stack, testcontainers, auto"):
        choose_backend("docker", UP, installed=True)


def test_the_probe_reports_a_missing_socket_and_an_unsupported_address(tmp_path: object) -> None:
    engine = probe_engine({"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert engine.address == "unix:///nonexistent/docker.sock"
    assert engine.answers is False
    assert engine.detail == "No such file or directory"
    assert probe_engine({"DOCKER_HOST": "ssh://user@host"}).detail == "unsupported scheme 'ssh'"
