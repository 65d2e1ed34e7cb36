"""How a pipeline spends memory: every low-memory decision in one object.

Normal mode opens every model at load (a bad file fails before any generation) and keeps it. Low-memory
mode (`low_memory=True`):
- opens each model only for the stage that runs it (text encoding, denoising, decoding) and releases it when
  no generation in any thread is in that stage;
- turns the backends' memory arenas off and lets ONNX Runtime stream the weights of models cut into parts (the UNet,
  SDXL's second text encoder) part by part;
- runs classifier-free guidance as two UNet calls of half the batch (half the activations; same numbers);
- decodes images larger than the VAE's native size in tiles (unless told otherwise).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from leansd.runtime.backends import LazySession, Session


@dataclass(frozen=True)
class MemoryPolicy:
    low_memory: bool = False

    def lazy(self, opener: Callable[[], Session]) -> LazySession:
        """A session that this policy opens and releases."""
        return LazySession(opener, transient=self.low_memory)

    def preload(self, *sessions: LazySession) -> None:
        """At load: open what every generation needs now, unless models are opened per stage."""
        if not self.low_memory:
            for session in sessions:
                session.open()

    @contextmanager
    def stage(self, *sessions: LazySession | None) -> Iterator[None]:
        """Keep `sessions` open (once opened) while a stage runs; in low-memory mode they are released after it."""
        with ExitStack() as stack:
            for session in sessions:
                if session is not None:
                    stack.enter_context(session.hold())
            yield

    def split_guidance(self, fixed_unet_batch: bool) -> bool:
        """Two UNet calls per guided step; static exports fix the UNet's batch, so they keep one call."""
        return self.low_memory and not fixed_unet_batch

    def vae_tiling(self, wanted: bool | None) -> bool:
        return self.low_memory if wanted is None else bool(wanted)

    LOW_MEMORY_TILE = 512  # pixels

    def vae_tile_size(self, native: int) -> int:
        """Tile size for a tiled decode: the VAE's native size (diffusers' `enable_tiling()` default), capped at 512
        pixels in low-memory mode. SDXL's native 1024 would decode a 1024x1024 image whole: 3.8 GB of activations
        against 1.4 GB in 512-pixel tiles (measured on the full-size model)."""
        return min(native, self.LOW_MEMORY_TILE) if self.low_memory else native
