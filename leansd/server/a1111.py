"""AUTOMATIC1111's web API (/sdapi/v1), the part clients use: Open WebUI, SillyTavern, webuiapi, Krita/GIMP plug-ins.

Field names, defaults and response shapes are A1111's; fields leansd has no use for are accepted and ignored,
because clients send A1111's whole payload. txt2img and img2img wait for their job (queued like any other).
"""
from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter
from PIL import ImageOps
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from leansd.runtime.image import load_mask
from leansd.runtime.version import __version__
from leansd.server import samplers
from leansd.server.errors import RequestError
from leansd.server.images import b64, decode_base64_image
from leansd.server.infotext import parse_parameters
from leansd.server.jobs import Job, JobManager
from leansd.server.registry import ServedModel
from leansd.server.spec import FieldNames, JobSpec

FIELDS = FieldNames({"num_inference_steps": "steps", "guidance_scale": "cfg_scale", "image": "init_images",
                     "mask_image": "mask", "strength": "denoising_strength", "scheduler": "sampler_name",
                     "count": "batch_size"})


class Txt2Img(BaseModel):
    """POST /sdapi/v1/txt2img: A1111's fields (defaults as A1111's API), unknown ones ignored. width and height
    default to the model's own size (512 for SD 1.x, A1111's default)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1
    steps: int = 50
    cfg_scale: float = 7.0
    sampler_name: str | None = None
    sampler_index: str | None = "Euler"
    scheduler: str | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    n_iter: int = 1
    override_settings: dict[str, Any] | None = None
    send_images: bool = True


class Img2Img(Txt2Img):
    """POST /sdapi/v1/img2img: also init_images (the first is used), denoising_strength, and for inpainting
    mask (white = repaint) and inpainting_mask_invert. mask_blur, inpainting_fill and inpaint_full_res are ignored."""

    init_images: list[str] = Field(default_factory=list)
    denoising_strength: float = 0.75
    mask: str | None = None
    inpainting_mask_invert: int = 0


class PngInfoRequest(BaseModel):
    image: str


def pick_model(manager: JobManager, body: Txt2Img) -> ServedModel:
    name = (body.override_settings or {}).get("sd_model_checkpoint")
    if name is None:
        return manager.registry.current
    if not isinstance(name, str):
        raise RequestError("override_settings.sd_model_checkpoint must be a model title or name", "override_settings.sd_model_checkpoint")
    return manager.registry.get(name, "override_settings.sd_model_checkpoint")


def build_spec(manager: JobManager, body: Txt2Img) -> JobSpec:
    model = pick_model(manager, body)
    sampler = samplers.resolve(body.sampler_name or body.sampler_index, body.scheduler,
                               "sampler_name" if body.sampler_name else "sampler_index")
    init = mask = strength = None
    if isinstance(body, Img2Img):
        if not body.init_images:
            raise RequestError("init_images must hold one base64-encoded image", "init_images")
        init = decode_base64_image(body.init_images[0], "init_images")
        strength = body.denoising_strength
        if body.mask:
            mask = load_mask(decode_base64_image(body.mask, "mask"))
            if body.inpainting_mask_invert:
                mask = ImageOps.invert(mask.convert("L"))
    for name in ("batch_size", "n_iter"):
        if getattr(body, name) < 1:
            raise RequestError(f"{name} must be at least 1, got {getattr(body, name)}", name)
    count = body.batch_size * body.n_iter
    if count > manager.limits.max_images:
        raise RequestError(f"batch_size x n_iter is {count}, more than the server's {manager.limits.max_images} images "
                           "per request (sd-serve --max-images)", "batch_size")
    spec = JobSpec(model, body.prompt, body.negative_prompt, body.steps, body.cfg_scale, body.seed, body.width, body.height,
                   sampler.scheduler if sampler else None, sampler.name if sampler else None, count, init, mask, strength, FIELDS,
                   clip_skip=clip_skip(body))
    return manager.check(spec)


def clip_skip(body: Txt2Img) -> int:
    """AUTOMATIC1111's clip skip setting (`override_settings.CLIP_stop_at_last_layers`, 1 = the last layer) in
    diffusers' numbering (0 = the last layer)."""
    value = (body.override_settings or {}).get("CLIP_stop_at_last_layers", 1)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
        raise RequestError(f"override_settings.CLIP_stop_at_last_layers must be a whole number from 1 to 12, got {value!r:.40}",
                           "override_settings.CLIP_stop_at_last_layers")
    return value - 1


def result(job: Job, body: Txt2Img) -> dict[str, Any]:
    """A1111's response: images (base64 PNG with the parameters chunk), parameters (the request), info (JSON text)."""
    spec = job.spec
    height, width = spec.size()
    seeds = [image.seed for image in job.images]
    count = len(job.images)
    info = {
        "prompt": spec.prompt, "all_prompts": [spec.prompt] * count, "negative_prompt": spec.negative_prompt or "",
        "all_negative_prompts": [spec.negative_prompt or ""] * count, "seed": seeds[0] if seeds else spec.seed,
        "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0, "width": width, "height": height,
        "sampler_name": spec.sampler_label or spec.model.sampler_label, "cfg_scale": spec.resolved_guidance(),
        "steps": spec.resolved_steps(), "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": spec.model.name, "sd_model_hash": spec.model.fingerprint[:10], "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": spec.strength if spec.init_image else None,
        "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": [image.infotext for image in job.images],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), "clip_skip": 1,
        "is_using_inpainting_conditioning": spec.model.inpainting, "version": f"leansd {__version__}",
    }
    parameters = body.model_dump()
    if "init_images" in parameters:
        parameters["init_images"], parameters["mask"] = None, None
    images = [b64(image.png) for image in job.images] if body.send_images else []
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def progress(manager: JobManager, skip_current_image: bool) -> dict[str, Any]:
    job = manager.current()
    if job is None:
        latest = next(iter(manager.jobs()), None)
        return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None, "current_task": None,
                "state": {"skipped": False, "interrupted": bool(latest and latest.interrupted), "stopping_generation": False,
                          "job": "", "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}
    done = job.step / job.total if job.total else 0.0
    elapsed = time.time() - (job.started or time.time())
    preview = None if skip_current_image else job.preview_png()
    return {
        "progress": done, "eta_relative": elapsed / done - elapsed if done > 0 else 0.0,
        "current_image": b64(preview) if preview else None, "textinfo": None, "current_task": job.id,
        "state": {"skipped": job.skip_requested.is_set(), "interrupted": job.interrupted, "stopping_generation": False,
                  "job": f"Batch {job.image_index + 1} out of {job.spec.count}", "job_count": job.spec.count,
                  "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)), "job_no": job.image_index,
                  "sampling_step": job.image_step, "sampling_steps": job.image_total},
    }


def router(manager: JobManager) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])
    registry = manager.registry

    async def generate(body: Txt2Img) -> dict[str, Any]:
        spec = await run_in_threadpool(build_spec, manager, body)
        job = manager.submit(spec, "a1111")
        await job.finished_wait()
        if job.status == "failed":
            raise RequestError(job.error or "the generation failed", job.error_field, job.error_status)
        return result(job, body)

    @api.post("/txt2img")
    async def txt2img(body: Txt2Img) -> dict:
        return await generate(body)

    @api.post("/img2img")
    async def img2img(body: Img2Img) -> dict:
        return await generate(body)

    @api.get("/sd-models")
    def sd_models() -> list[dict]:
        return [{"title": m.title, "model_name": m.name, "hash": m.fingerprint[:10], "sha256": m.fingerprint,
                 "filename": m.name, "config": None} for m in registry.models.values()]

    @api.post("/refresh-checkpoints")
    def refresh_checkpoints() -> None:
        return None

    @api.get("/options")
    def get_options() -> dict:
        model = registry.current
        return {"sd_model_checkpoint": model.title, "sd_checkpoint_hash": model.fingerprint, "sd_vae": "Automatic",
                "CLIP_stop_at_last_layers": 1, "samples_format": "png", "enable_pnginfo": True}

    @api.post("/options")
    def set_options(options: dict[str, Any]) -> None:
        name = options.get("sd_model_checkpoint")
        if name is not None:
            if not isinstance(name, str):
                raise RequestError("sd_model_checkpoint must be a model title or name", "sd_model_checkpoint")
            registry.switch(name)
        return None

    @api.get("/samplers")
    def get_samplers() -> list[dict]:
        return samplers.listing()

    @api.get("/schedulers")
    def get_schedulers() -> list[dict]:
        return [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if name == "karras" else -1,
                 "need_inner_model": False} for name, label in samplers.SCHEDULES.items()]

    @api.get("/progress")
    async def get_progress(skip_current_image: bool = False) -> dict:
        return await run_in_threadpool(progress, manager, skip_current_image)

    @api.post("/interrupt")
    def interrupt() -> dict:
        manager.interrupt()
        return {}

    @api.post("/skip")
    def skip() -> dict:
        manager.skip()
        return {}

    @api.get("/scripts")
    def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @api.get("/script-info")
    def script_info() -> list:
        return []

    for name in ("upscalers", "sd-vae", "hypernetworks", "prompt-styles", "face-restorers", "latent-upscale-modes"):
        api.add_api_route(f"/{name}", lambda: [], methods=["GET"], name=name)

    @api.get("/loras")
    def loras() -> list:
        """The LoRA files `<lora:NAME:WEIGHT>` can name (sd-serve --lora-dir), as AUTOMATIC1111 lists them."""
        folder = registry.current.pipe.adapters.lora_dir
        files = sorted(folder.glob("*.safetensors")) if folder is not None and folder.is_dir() else []
        return [{"name": f.stem, "alias": f.stem, "path": str(f.name), "metadata": {}} for f in files]

    @api.get("/cmd-flags")
    def cmd_flags() -> dict:
        return {}

    @api.get("/embeddings")
    def embeddings() -> dict:
        """The textual-inversion embeddings of the current model (sd-serve --embedding), as AUTOMATIC1111 lists them."""
        loaded = {e.token: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": int(e.vectors.shape[-1]),
                            "vectors": int(e.vectors.shape[0])} for e in registry.current.pipe.adapters.embeddings}
        return {"loaded": loaded, "skipped": {}}

    @api.post("/png-info")
    async def png_info(body: PngInfoRequest) -> dict:
        image = await run_in_threadpool(decode_base64_image, body.image, "image")
        items = {k: v for k, v in image.info.items() if isinstance(v, str)}
        text = items.pop("parameters", "")
        return {"info": text, "items": items, "parameters": parse_parameters(text) if text else {}}

    return api
