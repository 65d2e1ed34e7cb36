"""What sd-run shows on stderr while it works: a line while the models load and compile, then a bar per call's steps.

Models are compiled (OpenVINO) or optimized (ONNX Runtime) on first use, so the first image of a size can sit a
minute or more before its first step on SDXL; without the line the terminal looks hung. The line is shown on
terminals only: piped stderr (scripts, logs) keeps just the bar, as before.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from leansd.runtime.settings import StepCallback

PREPARING = "preparing: loading the models (each is compiled on first use: a minute or more for SDXL)"


class RunProgress:
    """The step callback of an sd-run run (the bar, and the preview PNG rewritten after each step), and `running()`
    around each pipeline call for the line before its first step. An existing preview file is only replaced with
    `overwrite`; after the first write it is ours."""

    def __init__(self, quiet: bool, preview: Path | None, overwrite: bool, preview_image: Callable[[Any], Any]) -> None:
        self.quiet, self.preview, self._preview_image = quiet, preview, preview_image
        self._preview_written = overwrite
        self._bar: Any = None

    @property
    def callback(self) -> StepCallback | None:
        """The callback to pass to the pipeline, or None when there is nothing to show or write."""
        return None if self.quiet and self.preview is None else self._step

    @contextmanager
    def running(self) -> Iterator[None]:
        """Around one pipeline call: the preparing line until its first step, cleared however the call ends."""
        if not self.quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=0, bar_format="{desc}", desc=PREPARING, leave=False)
        try:
            yield
        finally:
            self._close()

    def _step(self, step: int, total: int, latents: Any, denoised: Any) -> None:
        if not self.quiet:
            from tqdm import tqdm

            if step == 0 or self._bar is None:
                self._close()
                self._bar = tqdm(total=total, unit="step", leave=False, dynamic_ncols=True)
            self._bar.update(1)
            if step + 1 == total:
                self._close()
        if self.preview is not None:
            self._write_preview(denoised)

    def _write_preview(self, denoised: Any) -> None:
        from leansd.runtime.image import save_png, unit_to_pil
        from leansd.runtime.outputs import writing

        image = unit_to_pil(self._preview_image(denoised[:1]))[0]
        writing(self.preview, "--preview path", lambda: save_png(image, self.preview, overwrite=self._preview_written))
        self._preview_written = True

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
