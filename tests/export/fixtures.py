"""Session fixtures: each tiny model exported once per test session, for any test folder.

To share them with the whole suite, import them in `tests/conftest.py`:

    from tests.export.fixtures import exported_tiny_sd, exported_tiny_sd_vae4_vpred  # noqa: E402,F401

(`tests/export/conftest.py` then stops registering its own copies, so each export still runs once.)
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import HAS_TORCH


def _export(source: Path, out: Path, **kwargs) -> Path:
    if not HAS_TORCH:
        pytest.skip("needs torch and diffusers")
    import torch

    from leansd.export import export_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see _one_torch_thread in tests/export/conftest.py
    try:
        return export_model(source, out, progress=False, **kwargs)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def exported_tiny_sd(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_sd_dir` exported with dynamic shapes for both backends (ONNX and OpenVINO IR)."""
    return _export(tiny_sd_dir, tmp_path_factory.mktemp("exports") / "tiny-sd")


@pytest.fixture(scope="session")
def exported_tiny_sd_vae4_vpred(tiny_sd_vae4_vpred_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_sd_vae4_vpred_dir` (VAE factor 4, v-prediction) exported with dynamic shapes for both backends."""
    return _export(tiny_sd_vae4_vpred_dir, tmp_path_factory.mktemp("exports") / "tiny-sd-vae4-v")




@pytest.fixture(scope="session")
def exported_tiny_sd_inpaint(tiny_sd_inpaint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_sd_inpaint_dir` (9-channel UNet) exported with dynamic shapes for both backends."""
    return _export(tiny_sd_inpaint_dir, tmp_path_factory.mktemp("exports") / "tiny-sd-inpaint")


@pytest.fixture(scope="session")
def exported_tiny_sd_deepcache(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_sd_dir` exported for both backends with the deep-cache UNet parts (`deep_cache=True`)."""
    return _export(tiny_sd_dir, tmp_path_factory.mktemp("exports") / "tiny-sd-deepcache", deep_cache=True)
