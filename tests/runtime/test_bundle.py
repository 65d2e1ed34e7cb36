"""Model-folder validation: every broken folder gets an error that names the problem and the fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from leansd.runtime.bundle import ModelBundle
from leansd.runtime.errors import ModelFolderError


def write_minimal_folder(root: Path, manifest: dict | None = None) -> Path:
    (root / "scheduler").mkdir(parents=True)
    (root / "unet").mkdir()
    (root / "vae_decoder").mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler"}))
    (root / "unet" / "config.json").write_text(json.dumps({"in_channels": 4, "sample_size": 8}))
    (root / "vae_decoder" / "config.json").write_text(json.dumps({"block_out_channels": [8, 8], "scaling_factor": 0.5}))
    if manifest is not None:
        (root / "leansd.json").write_text(json.dumps(manifest))
    return root


def test_missing_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        ModelBundle.open(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"x")
    with pytest.raises(ModelFolderError, match="sd-export"):
        ModelBundle.open(f)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelFolderError, match="not a model folder"):
        ModelBundle.open(tmp_path)


def test_pytorch_diffusers_folder_is_pointed_to_the_exporter(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="sd-export"):
        ModelBundle.open(tmp_path)


def test_missing_config_names_the_file(tmp_path):
    root = write_minimal_folder(tmp_path / "m")
    (root / "unet" / "config.json").unlink()
    with pytest.raises(ModelFolderError, match=r"unet[/\\]config.json is missing"):
        ModelBundle.open(root)


def test_corrupt_manifest(tmp_path):
    root = write_minimal_folder(tmp_path / "m")
    (root / "leansd.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="not valid JSON"):
        ModelBundle.open(root)


def test_newer_format_asks_for_upgrade(tmp_path):
    root = write_minimal_folder(tmp_path / "m", {"format": "leansd-model", "format_version": 99})
    with pytest.raises(ModelFolderError, match="newer leansd"):
        ModelBundle.open(root)


def test_missing_component_file_names_backend_and_fix(tmp_path):
    root = write_minimal_folder(tmp_path / "m")
    bundle = ModelBundle.open(root)
    assert bundle.backends_present() == []
    with pytest.raises(ModelFolderError, match=r"no unet for onnxruntime.*--backend onnx"):
        bundle.component_file("unet", "onnxruntime")


def test_manifest_precision_not_exported(tmp_path):
    manifest = {"format": "leansd-model", "format_version": 1, "components": {"unet": {"onnx": {"fp32": "unet/model.onnx"}}}}
    root = write_minimal_folder(tmp_path / "m", manifest)
    (root / "unet" / "model.onnx").write_bytes(b"")
    bundle = ModelBundle.open(root)
    assert bundle.component_file("unet", "onnxruntime") == root / "unet" / "model.onnx"
    with pytest.raises(ModelFolderError, match="no int8 unet for onnxruntime.*available: fp32"):
        bundle.component_file("unet", "onnxruntime", "int8")


def test_corrupt_onnx_file_is_reported(tmp_path):
    pytest.importorskip("onnxruntime")
    from leansd.runtime.backends import open_session

    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ModelFolderError, match="not a loadable ONNX model"):
        open_session(bad, "onnxruntime")


def test_corrupt_openvino_file_is_reported(tmp_path):
    pytest.importorskip("openvino")
    from leansd.runtime.backends import open_session

    bad = tmp_path / "openvino_model.xml"
    bad.write_text("<net>broken")
    bad.with_suffix(".bin").write_bytes(b"")
    with pytest.raises(ModelFolderError, match="not a readable OpenVINO IR"):
        open_session(bad, "openvino")
