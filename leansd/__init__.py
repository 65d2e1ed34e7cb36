"""leansd: Stable Diffusion on any computer, without PyTorch at run time.

    import leansd
    pipe = leansd.load()                          # the bundled default model, or leansd.load("path/to/model")
    image = pipe("a red circle on a blue background", seed=1).images[0]
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["load", "Pipeline", "PipelineOutput", "__version__"]

if TYPE_CHECKING:
    from leansd.runtime.pipeline import Pipeline, PipelineOutput, load


def __getattr__(name: str) -> Any:
    # Imported on first use so `import leansd` stays instant (the CLI's --help, desktop apps' start-up).
    if name in ("load", "Pipeline", "PipelineOutput"):
        from leansd.runtime import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'leansd' has no attribute {name!r}")
