"""End-to-end tests: the whole pipeline as subprocesses on the real local stack."""

from __future__ import annotations

import pytest

from tests.integration.conftest import pg

__all__ = ["pg"]  # the fresh-database fixture, shared with the integration tests


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under tests/e2e talks to real servers.
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.stack)
