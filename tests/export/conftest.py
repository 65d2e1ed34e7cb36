"""Fixtures of the export tests. The exports themselves live in `fixtures.py` so other folders can share them."""
from __future__ import annotations

from pathlib import Path

import pytest

import tests.conftest as _root
from tests.conftest import HAS_TORCH

if not hasattr(_root, "exported_tiny_sd"):  # not yet shared suite-wide by the root conftest
    from tests.export.fixtures import exported_tiny_sd, exported_tiny_sd_vae4_vpred  # noqa: F401


@pytest.fixture(params=["exported_tiny_sd", "exported_tiny_sd_vae4_vpred"])
def exported(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(export folder, its diffusers source folder), for each tiny model."""
    source = {"exported_tiny_sd": "tiny_sd_dir", "exported_tiny_sd_vae4_vpred": "tiny_sd_vae4_vpred_dir"}[request.param]
    return request.getfixturevalue(request.param), request.getfixturevalue(source)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """PyTorch on one thread while these tests run. The tiny models gain nothing from two, and when other
    processes load the cores, OpenMP's spinning workers slow a 20 ms UNet call down to seconds."""
    if not HAS_TORCH:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
