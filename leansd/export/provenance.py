"""The provenance record of an export: its source and the versions of the libraries that wrote it."""
from __future__ import annotations

import sys

from leansd.export import layout
from leansd.export.sources import Source


def provenance(source: Source) -> dict[str, str]:
    """Where the export came from and the library versions that made it (leansd.json's `provenance`)."""
    import diffusers
    import onnxruntime
    import openvino
    import torch

    import leansd

    nncf = sys.modules.get("nncf")  # loaded only when it quantized something
    return {
        "source": source.spec,
        "source_kind": source.kind,
        "leansd_version": leansd.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "openvino": openvino.__version__,
        **({"nncf": nncf.__version__} if nncf is not None else {}),
        "exported_at": layout.now_iso(),
    }
