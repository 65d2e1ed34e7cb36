"""Shared, session-scoped fixtures. Expensive models are built once per test session."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("diffusers") is not None

needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs torch and diffusers (pip install -e .[export])")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x diffusers folder (VAE scale factor 2, epsilon prediction)."""
    if not HAS_TORCH:
        pytest.skip("needs torch and diffusers")
    from tests.tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd_vae4_vpred_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD folder with VAE scale factor 4 and v-prediction."""
    if not HAS_TORCH:
        pytest.skip("needs torch and diffusers")
    from tests.tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-vae4-v", vae_blocks=3, prediction_type="v_prediction", seed=1)


@pytest.fixture(scope="session")
def tiny_sd_inpaint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD 1.x inpainting folder: 9-channel UNet, saved as a StableDiffusionInpaintPipeline."""
    if not HAS_TORCH:
        pytest.skip("needs torch and diffusers")
    from tests.tiny_models import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd-inpaint", inpainting=True, seed=2)


# Exported tiny models, shared by the export, parity and CLI tests (each export runs once per session).
from tests.export.fixtures import (  # noqa: E402,F401
    exported_tiny_sd,
    exported_tiny_sd_deepcache,
    exported_tiny_sd_inpaint,
    exported_tiny_sd_vae4_vpred,
)
