"""What a server allows: limits on requests and on the queue, set by sd-serve's options."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask and on what the server keeps.

    max_width, max_height: pixels; max_steps: denoising steps; max_images: images per request (A1111's
    batch_size x n_iter, OpenAI's n, the job API's batch_size); max_body_bytes: a request body; max_queue: jobs
    waiting (not counting running ones) before requests get 429; history: finished jobs kept (with their images).
    preview_interval: fewest seconds between previews in one progress stream (0: each new one; see Job.preview).
    """

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_images: int = 8
    max_body_bytes: int = 32 * 1024 * 1024
    max_queue: int = 16
    history: int = 100
    preview_interval: float = 0.0
