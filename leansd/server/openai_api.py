"""OpenAI's Images API (/v1): generations, edits (inpainting: the mask's transparent pixels are repainted) and
the model list, so the `openai` client and apps built on it (Open WebUI's OpenAI engine...) can use leansd.

leansd's own settings ride along as extra fields: seed, steps, negative_prompt, guidance_scale (and strength for
edits). Names of OpenAI's own models (dall-e-2, gpt-image-1...) mean the default model.
"""
from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from PIL import Image
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from leansd.runtime.image import load_mask
from leansd.server.errors import RequestError
from leansd.server.images import b64, open_image
from leansd.server.jobs import Job, JobManager
from leansd.server.registry import ServedModel
from leansd.server.spec import FieldNames, JobSpec

FIELDS = FieldNames({"num_inference_steps": "steps", "count": "n", "height": "size", "width": "size", "scheduler": "sampler"})
OPENAI_MODELS = re.compile(r"^(dall-e-\d|gpt-image-.*)$")
FORMATS = ("b64_json", "url")


class GenerationRequest(BaseModel):
    """POST /v1/images/generations. size "WxH" (or "auto": the model's size); response_format b64_json (default)
    or url (served by this server while the job is in its history)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    model: str | None = None
    n: int = 1
    size: str | None = None
    response_format: str | None = None
    seed: int | None = None
    steps: int | None = None
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    sampler: str | None = None


def pick_model(manager: JobManager, name: str | None) -> ServedModel:
    if name is None or OPENAI_MODELS.match(name) and name not in manager.registry.models:
        return manager.registry.get(None)
    return manager.registry.get(name, "model")


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """(width, height) of "WxH"; None for none or "auto"."""
    if size is None or size == "auto":
        return None, None
    match = re.fullmatch(r"\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*", size)
    if not match:
        raise RequestError(f"size must be WIDTHxHEIGHT such as 512x512 (or auto), got {size!r:.40}", "size")
    return int(match.group(1)), int(match.group(2))


def check_format(response_format: str | None) -> str:
    if response_format is None:
        return "b64_json"
    if response_format not in FORMATS:
        raise RequestError(f"response_format must be one of {', '.join(FORMATS)}, got {response_format!r:.40}", "response_format")
    return response_format


def build_spec(manager: JobManager, prompt: Any, model: str | None, n: int, size: str | None, seed: int | None,
               steps: int | None, negative_prompt: str | None, guidance_scale: float | None, sampler: str | None,
               image: Image.Image | None = None, mask: Any = None, strength: float | None = None) -> JobSpec:
    from leansd.server import samplers

    if not isinstance(prompt, str) or not prompt.strip():
        raise RequestError("prompt must be a non-empty text", "prompt")
    width, height = parse_size(size)
    chosen = samplers.resolve(sampler, None, "sampler")
    spec = JobSpec(pick_model(manager, model), prompt, negative_prompt, steps, guidance_scale, seed, width, height,
                   chosen.scheduler if chosen else None, chosen.name if chosen else None, n, image, mask, strength, FIELDS)
    return manager.check(spec)


def result(job: Job, response_format: str, request: Request) -> dict[str, Any]:
    if response_format == "url":
        base = str(request.base_url).rstrip("/")
        data = [{"url": f"{base}/api/jobs/{job.id}/images/{i}.png", "revised_prompt": job.spec.prompt} for i in range(len(job.images))]
    else:
        data = [{"b64_json": b64(image.png), "revised_prompt": job.spec.prompt} for image in job.images]
    return {"created": int(job.created), "data": data}


def router(manager: JobManager) -> APIRouter:
    api = APIRouter(prefix="/v1", tags=["OpenAI"])

    async def run(spec: JobSpec, response_format: str, request: Request) -> dict[str, Any]:
        job = manager.submit(spec, "openai")
        await job.finished_wait()
        if job.status == "failed":
            raise RequestError(job.error or "the generation failed", job.error_field, job.error_status)
        if job.status == "cancelled" and not job.images:
            raise RequestError("the generation was cancelled", None, 503)
        return result(job, response_format, request)

    @api.get("/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "leansd"}
                                           for name in manager.registry.models]}

    @api.post("/images/generations")
    async def generations(body: GenerationRequest, request: Request) -> dict:
        response_format = check_format(body.response_format)
        spec = await run_in_threadpool(build_spec, manager, body.prompt, body.model, body.n, body.size, body.seed, body.steps,
                                       body.negative_prompt, body.guidance_scale, body.sampler)
        return await run(spec, response_format, request)

    @api.post("/images/edits")
    async def edits(
        request: Request,
        prompt: str = Form(...),
        image: UploadFile | None = File(None),
        mask: UploadFile | None = File(None),
        model: str | None = Form(None),
        n: int = Form(1),
        size: str | None = Form(None),
        response_format: str | None = Form(None),
        seed: int | None = Form(None),
        steps: int | None = Form(None),
        negative_prompt: str | None = Form(None),
        guidance_scale: float | None = Form(None),
        strength: float | None = Form(None),
        sampler: str | None = Form(None),
    ) -> dict:
        """Inpainting: `image` (PNG), and `mask` whose transparent pixels mark what to repaint; without a mask,
        the image's own transparent pixels are repainted."""
        response_format = check_format(response_format)
        if image is None:  # the client sends a list as image[]
            image = next((v for k, v in (await request.form()).multi_items() if k == "image[]" and not isinstance(v, str)), None)
        if image is None or isinstance(image, str):
            raise RequestError("image is required: the picture to edit, as a PNG file", "image")
        picture = open_image(await image.read(), "image")
        mask_source = open_image(await mask.read(), "mask") if mask is not None and not isinstance(mask, str) else picture
        masked = await run_in_threadpool(load_mask, mask_source)
        if mask_source is picture and not _has_transparency(picture):
            raise RequestError("image has no transparent pixels to repaint; send a mask (transparent = repaint) "
                               "or an image with transparent areas", "mask")
        spec = await run_in_threadpool(build_spec, manager, prompt, model, n, size, seed, steps, negative_prompt,
                                       guidance_scale, sampler, picture, masked, strength)
        return await run(spec, response_format, request)

    return api


def _has_transparency(image: Image.Image) -> bool:
    if image.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in image.info:
        return False
    return image.convert("RGBA").getchannel("A").getextrema()[0] < 255
