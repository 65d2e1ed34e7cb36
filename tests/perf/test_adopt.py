"""perf/adopt.py and perf/ir_weights.py: what the benchmark reads from folders and logs made outside it."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

PERF = Path(__file__).resolve().parents[2] / "perf"
sys.path.insert(0, str(PERF))

import adopt
import ir_weights

TIME = shutil.which("time", path="/usr/bin")
needs_time = pytest.mark.skipif(TIME is None, reason="GNU time is not installed at /usr/bin/time")


def _timed(tmp_path: Path, script: str) -> Path:
    """A log as `/usr/bin/time -v python -c SCRIPT > LOG 2>&1` writes it."""
    log = tmp_path / "export.log"
    with open(log, "w") as out:
        subprocess.run([TIME, "-v", sys.executable, "-c", script], stdout=out, stderr=subprocess.STDOUT, check=False)
    return log


@needs_time
def test_time_log_reads_wall_time_and_peak_memory(tmp_path):
    # 200 MB held for a moment: the peak RSS must show it, the wall time must show the sleep.
    log = _timed(tmp_path, "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)")
    info = adopt.time_log(log)
    assert 0.5 <= info["wall_s"] < 30
    assert 200 <= info["peak_rss_mb"] < 2000


@needs_time
def test_a_failed_command_is_not_adopted(tmp_path):
    with pytest.raises(adopt.AdoptError, match="exited with status 3"):
        adopt.time_log(_timed(tmp_path, "raise SystemExit(3)"))


def test_an_unfinished_log_is_not_adopted(tmp_path):
    log = tmp_path / "export.log"
    log.write_text("exporting unet ...\n")
    with pytest.raises(adopt.AdoptError, match="no complete /usr/bin/time -v report"):
        adopt.time_log(log)


def test_clock_formats():
    assert adopt._seconds("1:02:03") == 3723
    assert adopt._seconds("2:03.50") == 123.5


def test_an_export_without_its_manifest_is_not_adopted(tmp_path):
    (tmp_path / "out" / "unet").mkdir(parents=True)
    with pytest.raises(adopt.AdoptError, match="not finished"):
        adopt.export(tmp_path / "stamp.json", tmp_path / "out", tmp_path / "missing.log", {}, "sd-export SRC OUT")
    assert not (tmp_path / "stamp.json").exists()


@pytest.mark.parametrize("fp16", [False, True])
def test_ir_weights_counts_bytes_per_element_type(tmp_path, fp16):
    ov = pytest.importorskip("openvino")
    from openvino import opset13 as ops

    x = ops.parameter([1, 1024], np.float32, name="x")
    weights = ops.constant(np.random.default_rng(0).standard_normal((1024, 4096)).astype(np.float32))
    model = ov.Model([ops.matmul(x, weights, False, False)], [x])
    (tmp_path / "unet").mkdir()
    ov.save_model(model, tmp_path / "unet" / "openvino_model.xml", compress_to_fp16=fp16)
    expected = {"f16": 1024 * 4096 * 2 / 1e9} if fp16 else {"f32": 1024 * 4096 * 4 / 1e9}
    assert ir_weights.summary(tmp_path) == {"unet/openvino_model.xml": pytest.approx(expected, abs=1e-3)}
