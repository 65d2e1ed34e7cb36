"""perf/bench.py --processes: the cold image of a configuration is the median of several fresh processes."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

PERF = Path(__file__).resolve().parents[2] / "perf"
sys.path.insert(0, str(PERF))

import bench


class FakeBench:
    """Bench's process bookkeeping with _spawn replaced by canned worker results."""

    _more_cold_processes = bench.Bench._more_cold_processes

    def __init__(self, processes: int, results: list[dict]):
        self.args = SimpleNamespace(processes=processes)
        self.results = iter(results)
        self.runs: list[tuple[dict, Path]] = []

    def _spawn(self, peer, folder, options, run, out_dir):
        self.runs.append((run, out_dir))
        return next(self.results)


def ok(cold_s: float, rss_mb: float) -> dict:
    return {"status": "ok", "result": {"cold_s": cold_s}, "peak_rss_mb": rss_mb}


def test_the_row_reports_the_median_cold_image_and_the_largest_peak(tmp_path):
    fake = FakeBench(3, [ok(20.0, 2000.0), ok(40.0, 2100.0)])
    row = {"status": "ok", "result": {"cold_s": 30.0, "warm_image_s": 18.0}, "peak_rss_mb": 2050.0}
    fake._more_cold_processes(None, tmp_path, {}, {"images": 2, "repeats": 2, "steps": 20}, tmp_path, row)
    assert row["result"]["cold_s"] == 30.0 and row["result"]["cold_runs_s"] == [30.0, 20.0, 40.0]
    assert row["peak_rss_mb"] == 2100.0 and row["peak_rss_runs_mb"] == [2050.0, 2000.0, 2100.0]
    assert row["result"]["warm_image_s"] == 18.0  # the first process's other figures stay
    # the extra processes make only the cold image, each in a folder of its own
    assert [run["images"] for run, _ in fake.runs] == [1, 1] and [run["repeats"] for run, _ in fake.runs] == [0, 0]
    assert len({out for _, out in fake.runs} | {tmp_path}) == 3


def test_a_failed_extra_process_fails_the_row(tmp_path):
    fake = FakeBench(3, [{"status": "failed", "reason": "killed"}])
    row = {"status": "ok", "result": {"cold_s": 30.0}, "peak_rss_mb": 2050.0}
    fake._more_cold_processes(None, tmp_path, {}, {"images": 1, "repeats": 0}, tmp_path, row)
    assert row["status"] == "failed" and "process 2 of 3" in row["reason"] and "killed" in row["reason"]


def test_processes_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--processes", "0"])
    assert "--processes must be at least 1" in capsys.readouterr().err
