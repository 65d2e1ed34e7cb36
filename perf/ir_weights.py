"""What an OpenVINO IR stores its UNet weights as: bytes per element type, read from the IR's XML (no weights loaded).

This says what an export did with the weights (fp32 kept, fp16, or int8 weight-only compression with its scales),
which Optimum Intel decides by itself when its defaults are used.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path


def constant_bytes(xml_path: Path) -> dict[str, float]:
    """GB of constants per element type ("f32", "f16", "u8", "i8"...) in one IR."""
    sizes: Counter = Counter()
    for _, element in ET.iterparse(xml_path):
        if element.tag == "layer":
            data = element.find("data")
            if element.get("type") == "Const" and data is not None and data.get("size"):
                sizes[data.get("element_type", "?")] += int(data.get("size"))
            element.clear()  # the XML of a large UNet is tens of MB: keep memory flat
    total = sum(sizes.values()) or 1
    # Index and shape constants (i32, i64) are a rounding error beside the weights: left out.
    return {kind: round(n / 1e9, 3) for kind, n in sorted(sizes.items()) if n / total >= 0.01}


def summary(folder: Path) -> dict[str, dict[str, float]]:
    """The UNet IRs of a model folder (Optimum's `unet/openvino_model.xml`, leansd's per precision), each by element type."""
    unet = folder / "unet"
    if not unet.is_dir():
        return {}
    return {str(xml.relative_to(folder)): constant_bytes(xml) for xml in sorted(unet.rglob("openvino_model.xml"))}
