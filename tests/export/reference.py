"""Test helpers that do not use the exporter's own code: PyTorch references, ONNX Runtime and OpenVINO runs."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=4)
def torch_models(source: str) -> dict:
    """The tiny pipeline's PyTorch modules and tokenizer, loaded once per folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    return {
        "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet").eval(),
        "vae": AutoencoderKL.from_pretrained(source, subfolder="vae").eval(),
        "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder").eval(),
        "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
    }


def torch_outputs(component: str, models: dict, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What diffusers/transformers compute for a component's inputs, keyed by the exported output names."""
    import torch

    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        if component == "text_encoder":
            encoder = models["text_encoder"]
            out = encoder(t["input_ids"], output_hidden_states=True)
            # diffusers' clip_skip=N reads final_layer_norm(hidden_states[-(N + 1)]): every layer's, stacked on axis 1
            normed = torch.stack([encoder.text_model.final_layer_norm(h) for h in out.hidden_states], dim=1)
            return {"last_hidden_state": out.last_hidden_state.numpy(), "pooler_output": out.pooler_output.numpy(),
                    "normed_hidden_states": normed.numpy()}
        if component == "unet":
            return {"out_sample": models["unet"](t["sample"], t["timestep"], t["encoder_hidden_states"]).sample.numpy()}
        if component == "vae_encoder":
            dist = models["vae"].encode(t["sample"]).latent_dist
            return {"mean": dist.mean.numpy(), "logvar": dist.logvar.numpy()}
        return {"sample": models["vae"].decode(t["latent_sample"]).sample.numpy()}


def as_reference_names(component: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The VAE encoder's moments split the way diffusers' DiagonalGaussianDistribution does."""
    if component != "vae_encoder":
        return outputs
    mean, logvar = np.split(outputs["latent_parameters"], 2, axis=1)
    return {"mean": mean, "logvar": np.clip(logvar, -30.0, 20.0)}


@functools.lru_cache(maxsize=32)
def _session(backend: str, path: str):
    if backend == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    import openvino as ov

    return ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def run(backend: str, path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an exported file (sessions are cached per file: compiling dominates on tiny models)."""
    session = _session(backend, str(path))
    if backend == "onnx":
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))
    compiled = session
    result = compiled(feeds)
    return {name: np.asarray(result[o]) for o in compiled.outputs for name in o.get_names()}


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rel: float = 1e-4) -> None:
    """Every output within `rel` x its largest magnitude (at least 1)."""
    assert set(got) >= set(want), (sorted(got), sorted(want))
    for name, ref in want.items():
        assert got[name].shape == ref.shape, (name, got[name].shape, ref.shape)
        err = float(np.abs(got[name] - ref).max())
        assert err <= rel * max(1.0, float(np.abs(ref).max())), f"{name}: max-abs error {err}"


def inputs(component: str, models: dict, *, batch: int, height: int, width: int, seed: int, factor: int) -> dict[str, np.ndarray]:
    """Inputs for one component at an image size, drawn differently from the exporter's own."""
    rng = np.random.default_rng(seed)
    h, w = height // factor, width // factor
    if component == "text_encoder":
        prompts = ["a photo of an astronaut riding a horse", ""] * batch
        ids = models["tokenizer"](prompts[:batch], padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
        return {"input_ids": ids.astype(np.int64)}
    if component == "unet":
        return {
            "sample": rng.normal(size=(batch, 4, h, w)).astype(np.float32),
            "timestep": rng.uniform(0, 1000, size=(batch,)).astype(np.float32),
            "encoder_hidden_states": rng.normal(size=(batch, 77, 32)).astype(np.float32),
        }
    if component == "vae_encoder":
        return {"sample": rng.uniform(-1, 1, size=(batch, 3, height, width)).astype(np.float32)}
    return {"latent_sample": (rng.normal(size=(batch, 4, h, w)) / 0.18215).astype(np.float32)}
