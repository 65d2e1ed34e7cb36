"""The safety checker of SD 1.x pipelines (diffusers' `StableDiffusionSafetyChecker`), exported when the source has one.

The checker is a CLIP vision tower and projection whose image embedding is compared (cosine) with 17 concept and 3
"special care" embeddings; an image is flagged when a similarity passes its concept's threshold. The graph written here
computes the two cosine matrices (`special_cos_dist`, `cos_dist`) from the feature extractor's `clip_input`; the
thresholds go to `safety_checker/concepts.json` and the decision (diffusers' rounding and its 0.01 adjustment after a
special-care hit) is made by the runtime in numpy (`leansd.runtime.safety`), so that it is the PyTorch `forward`'s, not
the simplified one diffusers wrote for ONNX. The feature extractor's `preprocessor_config.json` is copied beside it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from leansd.export.auxiliary import export_verified
from leansd.export.diffusers_folder import Source
from leansd.export.errors import ExportError
from leansd.runtime.manifest import FEATURE_EXTRACTOR, SAFETY_CHECKER

COMPONENT = SAFETY_CHECKER
CONCEPTS_FILE = "concepts.json"
PREPROCESSOR_FILE = "preprocessor_config.json"
VERIFY_BATCH = 2


def present(source: Source) -> bool:
    """Whether the source folder has a safety checker (config and weights) and its feature extractor, and model_index.json
    names both (a folder saved with safety_checker=None has neither entry)."""
    index = source.model_index()
    named = all(isinstance(index.get(n), list) and index[n][:1] != [None] for n in (COMPONENT, FEATURE_EXTRACTOR))
    folder = source.config_dir
    weights = any((folder / COMPONENT / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))
    return (named and source.kind != "single_file" and weights and (folder / COMPONENT / "config.json").is_file()
            and (folder / FEATURE_EXTRACTOR / PREPROCESSOR_FILE).is_file())


def load(source: Source) -> Any:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    try:
        return StableDiffusionSafetyChecker.from_pretrained(source.config_dir / COMPONENT).float().eval()
    except (OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ExportError(f"cannot load the safety checker of '{source.spec}': {first}; check that safety_checker/ has its weights") from None


def wrap(checker: Any) -> Any:
    """clip_input -> (special_cos_dist, cos_dist), as the first lines of the checker's forward compute them."""
    import torch

    class Graph(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, clip_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            pooled = self.model.vision_model(clip_input)[1]
            embeds = torch.nn.functional.normalize(self.model.visual_projection(pooled))
            special = torch.nn.functional.normalize(self.model.special_care_embeds)
            concepts = torch.nn.functional.normalize(self.model.concept_embeds)
            return embeds @ special.t(), embeds @ concepts.t()

    return Graph(checker).eval()


def convert_openvino(onnx_path: Path, xml_path: Path) -> None:
    """ONNX -> OpenVINO IR (fp32), the input named `clip_input` only: the conversion folds CLIP's no-op cast of the pixels
    into the input, which then also answers to the cast's name (and a runtime asking for any one name may get that one)."""
    import openvino as ov

    model = ov.convert_model(str(onnx_path))
    model.inputs[0].get_tensor().set_names({"clip_input"})
    ov.save_model(model, str(xml_path), compress_to_fp16=False)


def input_size(checker: Any) -> int:
    return int(checker.config.vision_config.image_size)


def export(source: Source, root: Path, backends: tuple[str, ...], opset: int, tolerance: float) -> tuple[dict, dict]:
    """Write the checker's graph for each backend, its thresholds and the feature extractor's config under `root`;
    verify each file against PyTorch. Returns ({backend: {"fp32": path}}, {backend: {"fp32": parity}})."""
    import torch

    checker = load(source)
    size = input_size(checker)
    graph = wrap(checker)
    rng = np.random.default_rng(1)
    feeds = {"clip_input": rng.standard_normal((VERIFY_BATCH, 3, size, size)).astype(np.float32)}
    with torch.no_grad():
        special, concepts = graph(torch.from_numpy(feeds["clip_input"]))
    reference = {"special_cos_dist": special.numpy(), "cos_dist": concepts.numpy()}
    folder = root / COMPONENT
    example = {"clip_input": rng.standard_normal((1, 3, size, size)).astype(np.float32)}
    files, parity = export_verified(COMPONENT, graph, example, feeds, reference, root, backends, opset, tolerance)
    thresholds = {
        "special_care_thresholds": [float(v) for v in checker.special_care_embeds_weights.detach().numpy()],
        "concept_thresholds": [float(v) for v in checker.concept_embeds_weights.detach().numpy()],
        "image_size": size,
    }
    (folder / CONCEPTS_FILE).write_text(json.dumps(thresholds, indent=2))
    shutil.copyfile(source.config_dir / COMPONENT / "config.json", folder / "config.json")
    (root / FEATURE_EXTRACTOR).mkdir(exist_ok=True)
    shutil.copyfile(source.config_dir / FEATURE_EXTRACTOR / PREPROCESSOR_FILE, root / FEATURE_EXTRACTOR / PREPROCESSOR_FILE)
    return files, parity
