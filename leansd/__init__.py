"""leansd: Stable Diffusion on any computer, without PyTorch at run time.

    import leansd
    pipe = leansd.load()                          # the bundled default model, or leansd.load("path/to/model")
    image = pipe("a red circle on a blue background", seed=1).images[0]

Errors a user can fix are `leansd.LeanSDError`s (one-line messages naming the fix); a step callback that
returns False stops a generation with `leansd.Cancelled`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from leansd.runtime.errors import BackendError, Cancelled, InvalidInputError, LeanSDError, LeanSDWarning, ModelFolderError
from leansd.runtime.version import __version__

__all__ = [
    "load", "Pipeline", "PipelineOutput", "GenerationSettings", "LeanSDError", "Cancelled", "InvalidInputError",
    "ModelFolderError", "BackendError", "LeanSDWarning", "__version__",
]

if TYPE_CHECKING:
    from leansd.runtime.loader import load
    from leansd.runtime.pipeline import Pipeline, PipelineOutput
    from leansd.runtime.settings import GenerationSettings

_LAZY = {"load": "loader", "Pipeline": "pipeline", "PipelineOutput": "pipeline", "GenerationSettings": "settings"}


def __getattr__(name: str) -> Any:
    # Imported on first use so `import leansd` stays instant (the CLI's --help, desktop apps' start-up).
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"leansd.runtime.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'leansd' has no attribute {name!r}")
