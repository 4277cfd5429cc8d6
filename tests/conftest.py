"""Fixtures shared by the test suite; plain helpers live in tests/helpers.py and its siblings."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.custom_ops_testlib import ensure_cpu_library


@pytest.fixture(scope="session")
def cpu_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CPU custom-op library: the built one, or one built now (the tests skip, saying why, when
    it cannot be built here)."""
    return ensure_cpu_library(tmp_path_factory.mktemp("ops"))
