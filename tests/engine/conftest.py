"""Fixtures of the engine tests (models on disk: see engine_helpers)."""
from pathlib import Path

import pytest

from engine_helpers import make_models


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> Path:
    return make_models(tmp_path_factory.mktemp("engine-models"))
