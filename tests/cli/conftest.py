from __future__ import annotations

from pathlib import Path

import pytest

from leansd.runtime.loader import bundled_model_path


@pytest.fixture(scope="session")
def cli_model(request) -> Path:
    """A small model folder to drive the CLI with: the bundled model, else the exported tiny test model."""
    if (bundled_model_path() / "leansd.json").is_file():
        return bundled_model_path()
    return request.getfixturevalue("exported_tiny_sd")
