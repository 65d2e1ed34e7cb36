"""Jobs, the bounded queue, and one worker thread per model.

A job goes queued -> running -> done | failed | cancelled. Each model has its own queue and one worker thread
that runs its jobs one at a time (a loaded pipeline is shared and thread-safe, so models run side by side).
Job state changes under the job's lock; waiters in the event loop are woken through `call_soon_threadsafe`,
so HTTP handlers never block a thread while they wait.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from leansd.server.config import Limits
from leansd.server.errors import RequestError
from leansd.server.registry import ModelRegistry
from leansd.server.spec import JobSpec

log = logging.getLogger("leansd.server")
ACTIVE, FINISHED = ("queued", "running"), ("done", "failed", "cancelled")
PREVIEW_SHARE = 0.2  # the most of a running job's time that decoding its previews may take


@dataclass
class JobImage:
    png: bytes
    seed: int
    infotext: str


class Job:
    """One request's generation: its spec, state, progress, latest preview and finished images."""

    def __init__(self, spec: JobSpec, api: str):
        self.id = uuid.uuid4().hex  # unguessable: image URLs carry it instead of a key
        self.spec, self.api = spec, api
        self.status = "queued"
        self.error: str | None = None
        self.error_field: str | None = None
        self.error_status = 500
        self.images: list[JobImage] = []
        self.created, self.started, self.finished = time.time(), None, None
        self.image_index, self.image_step, self.image_total = 0, 0, spec.resolved_steps()
        self.cancel_requested = threading.Event()
        self.skip_requested = threading.Event()
        self.interrupted = False  # cancelled by A1111's interrupt (its progress reports it)
        self.version = 0  # bumped on every change; streams wait for it to move
        self._denoised: np.ndarray | None = None
        self._preview: tuple[int, bytes, float] | None = None  # (version it was made at, PNG, when)
        self._preview_cost = 0.0  # seconds the last preview took to decode
        self._lock = threading.Lock()
        self._preview_lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._done = threading.Event()

    # ---------------------------------------------------------------- progress, from the worker thread
    @property
    def step(self) -> int:
        return self.image_index * self.image_total + self.image_step

    @property
    def total(self) -> int:
        return self.spec.count * self.image_total

    def update(self, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self, key, value)
            self.version += 1
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)
        if self.status in FINISHED:
            self._done.set()

    def progress(self, index: int, step: int, total: int, denoised: np.ndarray) -> None:
        self.update(image_index=index, image_step=step, image_total=total, _denoised=np.array(denoised[:1], copy=True))

    # ---------------------------------------------------------------- reading
    def preview(self) -> tuple[int, bytes] | None:
        """(version, PNG) of the latest step preview: the denoised estimate decoded quickly (the tiny VAE when the
        folder has one). Made only when asked, and at most so often that decoding previews takes no more than
        PREVIEW_SHARE of the time (a full VAE decode of a large image can take seconds); None before the first step."""
        from leansd.server.images import unit_png

        with self._preview_lock:
            version, denoised = self.version, self._denoised
            if denoised is None:
                return None
            made = self._preview
            wait = self._preview_cost * (1 / PREVIEW_SHARE - 1)
            if made is None or made[0] != version and time.monotonic() - made[2] >= wait:
                start = time.monotonic()
                png = unit_png(self.spec.model.pipe.preview(denoised)[0])
                self._preview_cost = time.monotonic() - start
                self._preview = made = (version, png, time.monotonic())
            return made[0], made[1]

    def preview_png(self) -> bytes | None:
        latest = self.preview()
        return None if latest is None else latest[1]

    async def changed(self, seen: int, timeout: float) -> int:
        """Wait until the job's version moves past `seen` (or `timeout` seconds); return the version."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self.version != seen:
                return self.version
            self._waiters.append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            pass
        return self.version

    async def finished_wait(self) -> None:
        while self.status not in FINISHED:
            await self.changed(self.version, 1.0)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job has finished (for threads; the event loop uses `finished_wait`)."""
        return self._done.wait(timeout)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class JobManager:
    """Queues per model (bounded in total), worker threads, cancel/skip, and a bounded history."""

    def __init__(self, registry: ModelRegistry, limits: Limits, step_delay: float = 0.0):
        self.registry, self.limits = registry, limits
        self.step_delay = step_delay  # seconds slept after each step: lets tests watch and cancel a running job
        self._lock = threading.Condition()
        self._queues: dict[str, collections.deque[Job]] = {name: collections.deque() for name in registry.models}
        self._running: dict[str, Job | None] = {name: None for name in registry.models}
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._threads: list[threading.Thread] = []
        self.stopping = False

    def start(self) -> None:
        from leansd.server.worker import run_job

        for name in self._queues:
            thread = threading.Thread(target=self._work, args=(name, run_job), name=f"sd-serve-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def check(self, spec: JobSpec) -> JobSpec:
        """`spec` checked against the limits and its model (the memory check only while no job runs)."""
        return spec.checked(self.limits, check_memory=not self.running())

    def submit(self, spec: JobSpec, api: str) -> Job:
        """Queue a checked spec; 429 when the queue is full, 503 when the server is stopping."""
        with self._lock:
            if self.stopping:
                raise RequestError("the server is shutting down; try again later", None, 503)
            waiting = sum(len(q) for q in self._queues.values())
            if waiting >= self.limits.max_queue:
                raise RequestError(f"the queue is full ({waiting} jobs waiting); try again later "
                                   "(sd-serve --max-queue sets its length)", None, 429)
            job = Job(spec, api)
            self._queues[spec.model.name].append(job)
            self._jobs[job.id] = job
            self._trim()
            self._lock.notify_all()
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise RequestError(f"no job {job_id!r:.40} (finished jobs are kept for the last {self.limits.history})", "id", 404)
        return job

    def jobs(self) -> list[Job]:
        """Every known job, newest first."""
        with self._lock:
            return list(reversed(self._jobs.values()))

    def position(self, job: Job) -> int | None:
        """How many jobs run or wait before this one starts (0: running or next); None when finished."""
        with self._lock:
            if job.status == "running":
                return 0
            queue = self._queues[job.spec.model.name]
            if job not in queue:
                return None
            return queue.index(job) + (self._running[job.spec.model.name] is not None)

    def running(self) -> list[Job]:
        with self._lock:
            return [j for j in self._running.values() if j is not None]

    def current(self) -> Job | None:
        """The running job started last (AUTOMATIC1111's progress reports one job)."""
        running = self.running()
        return max(running, key=lambda j: j.started or 0) if running else None

    def cancel(self, job: Job, interrupted: bool = False) -> None:
        """Cancel a queued job at once, or ask a running one to stop after its current step."""
        with self._lock:
            queue = self._queues[job.spec.model.name]
            if job in queue:
                queue.remove(job)
                job.update(status="cancelled", finished=time.time())
                return
        if job.status == "running":
            job.interrupted = job.interrupted or interrupted
            job.cancel_requested.set()

    def interrupt(self) -> int:
        """AUTOMATIC1111's interrupt: stop every running job (keeping the images already finished)."""
        running = self.running()
        for job in running:
            self.cancel(job, interrupted=True)
        return len(running)

    def skip(self) -> int:
        """AUTOMATIC1111's skip: drop the image being made by every running job; the job goes on with the next."""
        running = self.running()
        for job in running:
            job.skip_requested.set()
        return len(running)

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, cancel the queued ones, ask the running ones to stop, and wait for the workers."""
        with self._lock:
            self.stopping = True
            queued = [job for q in self._queues.values() for job in q]
            for q in self._queues.values():
                q.clear()
            self._lock.notify_all()
        for job in queued:
            job.update(status="cancelled", finished=time.time(), error="the server stopped")
        for job in self.running():
            job.cancel_requested.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _trim(self) -> None:
        finished = [job_id for job_id, job in self._jobs.items() if job.status in FINISHED]
        for job_id in finished[: max(0, len(finished) - self.limits.history)]:
            del self._jobs[job_id]

    def _work(self, name: str, run_job: Any) -> None:
        queue = self._queues[name]
        while True:
            with self._lock:
                while not queue and not self.stopping:
                    self._lock.wait()
                if self.stopping and not queue:
                    return
                job = queue.popleft()
                self._running[name] = job
                job.update(status="running", started=time.time())
            try:
                run_job(job, self.step_delay)
            except BaseException:  # run_job records every error on the job; this is the last line of defence
                log.exception("job %s failed", job.id)
                job.update(status="failed", error="internal error; see the server's log", finished=time.time())
            finally:
                with self._lock:
                    self._running[name] = None
                    self._trim()
