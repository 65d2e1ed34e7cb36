"""The depth estimator of depth-to-image pipelines (diffusers' `StableDiffusionDepth2ImgPipeline`: transformers'
`DPTForDepthEstimation`, DPT-Hybrid in SD 2's depth model), exported when the source folder has one.

The graph is the model itself, `pixel_values` (N x 3 x H x W, the feature extractor's output) -> `predicted_depth`
(N x H' x W'), verified against PyTorch like every component. Its input size is the one the feature extractor resizes
every image to (`size`, without `keep_aspect_ratio`: 384 x 384 for SD 2's), fixed in the graph; the feature extractor's
`preprocessor_config.json` is copied to `feature_extractor/` for the runtime (`leansd.runtime.depth`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from leansd.export.auxiliary import export_verified
from leansd.export.diffusers_folder import Source, read_json
from leansd.export.errors import ExportError
from leansd.runtime.manifest import DEPTH_ESTIMATOR, FEATURE_EXTRACTOR

COMPONENT = DEPTH_ESTIMATOR
PREPROCESSOR_FILE = "preprocessor_config.json"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def present(source: Source) -> bool:
    """Whether the source is a depth model whose folder has the estimator (config and weights) and its feature extractor."""
    index, folder = source.model_index(), source.config_dir
    named = isinstance(index.get(COMPONENT), list) and index[COMPONENT][:1] != [None]
    return (named and source.kind != "single_file" and (folder / COMPONENT / "config.json").is_file()
            and any((folder / COMPONENT / w).is_file() for w in WEIGHTS) and (folder / FEATURE_EXTRACTOR / PREPROCESSOR_FILE).is_file())


def input_size(config: dict[str, Any], where: Path) -> tuple[int, int]:
    """The fixed (height, width) the feature extractor resizes every image to; refuse configs whose size varies."""
    size = config.get("size", 384)
    if isinstance(size, int):
        size = {"height": size, "width": size}
    if config.get("keep_aspect_ratio") or config.get("do_pad") or not config.get("do_resize", True) or not isinstance(size, dict) \
            or not all(isinstance(size.get(k), int) for k in ("height", "width")):
        raise ExportError(f"'{where}' resizes images to varying sizes (keep_aspect_ratio, do_pad or no fixed size), which sd-export's "
                          "depth estimator export does not take; export without it (give depth maps at run time)")
    multiple = int(config.get("ensure_multiple_of", 1))
    return tuple(int(round(size[k] / multiple) * multiple) for k in ("height", "width"))  # type: ignore[return-value]


def load(source: Source) -> Any:
    from transformers import DPTForDepthEstimation

    try:
        return DPTForDepthEstimation.from_pretrained(source.config_dir / COMPONENT).float().eval()
    except (OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ExportError(f"cannot load the depth estimator of '{source.spec}': {first}; check that depth_estimator/ has its weights") from None


def wrap(model: Any) -> Any:
    import torch

    class Graph(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.inner(pixel_values=pixel_values).predicted_depth

    return Graph(model).eval()


def export(source: Source, root: Path, backends: tuple[str, ...], opset: int, tolerance: float) -> tuple[dict, dict]:
    """Write the estimator for each backend and the feature extractor's config under `root`, each file verified against
    PyTorch. Returns ({backend: {"fp32": path}}, {backend: {"fp32": parity}})."""
    import torch

    preprocessor = source.config_dir / FEATURE_EXTRACTOR / PREPROCESSOR_FILE
    height, width = input_size(read_json(preprocessor), preprocessor)
    graph = wrap(load(source))
    rng = np.random.default_rng(1)
    feeds = {"pixel_values": rng.uniform(-1, 1, size=(2, 3, height, width)).astype(np.float32)}
    with torch.no_grad():
        reference = {"predicted_depth": graph(torch.from_numpy(feeds["pixel_values"])).numpy()}
    folder = root / COMPONENT
    example = {"pixel_values": rng.uniform(-1, 1, size=(1, 3, height, width)).astype(np.float32)}
    files, parity = export_verified(COMPONENT, graph, example, feeds, reference, root, backends, opset, tolerance)
    shutil.copyfile(source.config_dir / COMPONENT / "config.json", folder / "config.json")
    (root / FEATURE_EXTRACTOR).mkdir(exist_ok=True)
    shutil.copyfile(preprocessor, root / FEATURE_EXTRACTOR / PREPROCESSOR_FILE)
    return files, parity
