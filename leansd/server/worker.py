"""What a worker thread does with one job: one pipeline call per image (image i with seed + i, as
AUTOMATIC1111 numbers a batch's seeds), progress through the step callback, and every error kept on the job."""
from __future__ import annotations

import logging
import time
from types import SimpleNamespace

from leansd.runtime.errors import Cancelled, InsufficientMemoryError, LeanSDError
from leansd.runtime.image import a1111_parameters
from leansd.runtime.outputs import image_parameters
from leansd.server.images import png_bytes
from leansd.server.jobs import Job, JobImage

log = logging.getLogger("leansd.server")


def run_job(job: Job, step_delay: float = 0.0) -> None:
    spec, pipe = job.spec, job.spec.model.pipe
    for index in range(spec.count):
        if job.cancel_requested.is_set():
            break
        job.skip_requested.clear()

        def callback(step: int, total: int, latents, denoised, index: int = index) -> bool:
            job.progress(index, step + 1, total, denoised)
            if step_delay:
                time.sleep(step_delay)
            return not (job.cancel_requested.is_set() or job.skip_requested.is_set())

        try:
            result = pipe(**spec.call_settings(index), callback=callback)
        except Cancelled:
            if job.cancel_requested.is_set():
                break
            continue  # skipped: on with the next image
        except InsufficientMemoryError as exc:
            return _failed(job, str(exc), spec.fields["width"], 503)
        except LeanSDError as exc:
            return _failed(job, str(exc), spec.fields.of_message(str(exc)), 400)
        except Exception as exc:  # a bug or a backend crash: this job fails, the server goes on
            log.exception("job %s failed", job.id)
            return _failed(job, f"internal error ({type(exc).__name__}: {exc}); see the server's log", None, 500)
        image = result.images[0]
        # sd-run's `parameters` chunk, field for field: each image is its own call, so a batch of one.
        text = a1111_parameters(result.settings.prompt, result.settings.negative_prompt,
                                image_parameters(SimpleNamespace(num_images=1), pipe, result, image, 0))
        job.update(images=[*job.images, JobImage(png_bytes(image, text), int(result.seed), text)],
                   image_index=index, image_step=job.image_total)
    status = "cancelled" if job.cancel_requested.is_set() else "done"
    job.update(status=status, finished=time.time())


def _failed(job: Job, message: str, field: str | None, status: int) -> None:
    job.update(status="failed", error=message, error_field=field, error_status=status, finished=time.time())
