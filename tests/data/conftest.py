"""Fixtures of the data tests; the helpers live in data_fixtures.py (a unique module name, since
several test areas have a conftest.py)."""

from __future__ import annotations

import pytest
from data_fixtures import make_study


@pytest.fixture(scope="session")
def study_path(tmp_path_factory):
    """One shared small study (corpora + index cache); tests must not modify it."""
    return make_study(str(tmp_path_factory.mktemp("study")))
