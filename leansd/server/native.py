"""The job API the web page uses (/api): submit, status, a server-sent-events stream, previews, images, cancel."""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from leansd.server import samplers
from leansd.server.errors import RequestError
from leansd.server.images import b64, decode_base64_image
from leansd.server.jobs import FINISHED, Job, JobManager
from leansd.server.spec import FieldNames, JobSpec

FIELDS = FieldNames({"num_inference_steps": "steps", "image": "init_image", "mask_image": "mask", "scheduler": "sampler",
                     "count": "batch_size"})


class JobRequest(BaseModel):
    """POST /api/jobs. seed null or -1: random; init_image and mask: base64 (a data: URL too); mask: white or
    transparent = repaint; sampler: an AUTOMATIC1111 name ("Euler a") or a leansd alias ("euler_a")."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    model: str | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    batch_size: int = 1
    init_image: str | None = None
    strength: float | None = None
    mask: str | None = None


def build_spec(body: JobRequest, manager: JobManager) -> JobSpec:
    model = manager.registry.get(body.model, "model")
    sampler = samplers.resolve(body.sampler, None, "sampler")
    spec = JobSpec(
        model, body.prompt, body.negative_prompt, body.steps, body.guidance_scale, body.seed, body.width, body.height,
        sampler.scheduler if sampler else None, sampler.name if sampler else None, body.batch_size,
        decode_base64_image(body.init_image, "init_image") if body.init_image else None,
        decode_base64_image(body.mask, "mask") if body.mask else None, body.strength, FIELDS,
    )
    return manager.check(spec)


def job_json(manager: JobManager, job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "status": job.status, "position": manager.position(job), "step": job.step, "total": job.total,
        "error": job.error, "field": job.error_field, "request": job.spec.summary(),
        "images": [{"url": f"/api/jobs/{job.id}/images/{i}.png", "seed": image.seed, "infotext": image.infotext}
                   for i, image in enumerate(job.images)],
        "created": job.created, "started": job.started, "finished": job.finished,
    }


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def router(manager: JobManager) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["jobs"])

    @api.get("/models")
    def models() -> dict:
        registry = manager.registry
        limits = manager.limits
        return {"models": [m.describe(m.name == registry.default_name) for m in registry.models.values()],
                "samplers": [{"name": s["name"], "aliases": s["aliases"]} for s in samplers.listing()],
                "limits": {"max_steps": limits.max_steps, "max_batch": limits.max_images, "max_width": limits.max_width,
                           "max_height": limits.max_height, "max_queue": limits.max_queue}}

    @api.post("/jobs", status_code=202)
    async def submit(body: JobRequest) -> JSONResponse:
        spec = await run_in_threadpool(build_spec, body, manager)
        job = manager.submit(spec, "native")
        return JSONResponse({"id": job.id, "status": job.status, "position": manager.position(job)}, status_code=202)

    @api.get("/jobs")
    def jobs() -> dict:
        return {"jobs": [job_json(manager, job) for job in manager.jobs()]}

    @api.get("/jobs/{job_id}")
    def job(job_id: str) -> dict:
        return job_json(manager, manager.get(job_id))

    @api.post("/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict:
        job = manager.get(job_id)
        manager.cancel(job)
        return job_json(manager, job)

    @api.delete("/jobs/{job_id}")
    def delete(job_id: str) -> dict:
        return cancel(job_id)

    @api.get("/jobs/{job_id}/preview.png", response_class=Response)
    async def preview(job_id: str) -> Response:
        png = await run_in_threadpool(manager.get(job_id).preview_png)
        if png is None:
            raise RequestError("this job has no preview yet; it appears after the first step", "id", 404)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @api.get("/jobs/{job_id}/images/{index}.png", response_class=Response)
    def image(job_id: str, index: int) -> Response:
        job = manager.get(job_id)
        if not 0 <= index < len(job.images):
            raise RequestError(f"job {job_id} has {len(job.images)} image(s); image {index} does not exist", "index", 404)
        return Response(job.images[index].png, media_type="image/png",
                        headers={"Content-Disposition": f'inline; filename="leansd-{job.images[index].seed}.png"'})

    @api.get("/jobs/{job_id}/events", response_class=StreamingResponse)
    def events(job_id: str) -> StreamingResponse:
        job = manager.get(job_id)
        return StreamingResponse(stream(manager, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return api


async def stream(manager: JobManager, job: Job) -> AsyncIterator[str]:
    """`status` first, a `progress` event whenever the step moves (with a new preview when one is ready, at most
    every preview_interval seconds: see Job.preview), a `status` event when the job starts, and one final
    done|failed|cancelled."""
    version, status, step, last_preview, sent = job.version, job.status, None, float("-inf"), None
    yield sse("status", job_json(manager, job))
    while True:
        if job.status in FINISHED:
            yield sse(job.status, job_json(manager, job))
            return
        if job.status != status:
            status = job.status
            yield sse("status", job_json(manager, job))
        current, total = job.step, job.total
        if job.status == "running" and current != step and current > 0:
            step, preview = current, None
            if time.monotonic() - last_preview >= manager.limits.preview_interval:
                latest = await run_in_threadpool(job.preview)
                if latest is not None and latest[0] != sent:  # a new picture, not the one already sent
                    sent, last_preview = latest[0], time.monotonic()
                    preview = "data:image/png;base64," + b64(latest[1])
            yield sse("progress", {"step": current, "total": total, "preview": preview})
        seen = version
        version = await job.changed(version, 15.0)
        if version == seen:
            yield ": keep-alive\n\n"
