"""leansd: Stable Diffusion on any computer, without PyTorch at run time.

    import leansd
    pipe = leansd.load("path/to/model")          # or leansd.load() for the bundled default model
    image = pipe("a red circle on a blue background", seed=1).images[0]
"""
from __future__ import annotations

__version__ = "0.1.0"

from leansd.runtime.pipeline import Pipeline, PipelineOutput, load  # noqa: E402

__all__ = ["load", "Pipeline", "PipelineOutput", "__version__"]
