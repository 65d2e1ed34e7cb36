"""perf/bench.py --cap-isa: measuring processes run with oneDNN capped, and the report says it is a proxy."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

PERF = Path(__file__).resolve().parents[2] / "perf"
sys.path.insert(0, str(PERF))

import bench
import report

SHOW_ENV = "import os; print({k: os.environ.get(k) for k in ('ONEDNN_MAX_CPU_ISA', 'ATEN_CPU_CAPABILITY', 'MKL_ENABLE_INSTRUCTIONS')})"


def test_a_capped_process_gets_the_caps_and_an_uncapped_one_none(tmp_path):
    capped = bench.launch([sys.executable, "-c", SHOW_ENV], tmp_path / "capped.log", 60, env_extra=bench.isa_cap_env("avx2"))
    assert capped["returncode"] == 0
    assert "{'ONEDNN_MAX_CPU_ISA': 'AVX2', 'ATEN_CPU_CAPABILITY': 'avx2', 'MKL_ENABLE_INSTRUCTIONS': 'AVX2'}" in (tmp_path / "capped.log").read_text()
    assert bench.isa_cap_env("avx512_core_vnni") == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}
    assert bench.isa_cap_env(None) == {}


def test_the_report_of_a_capped_run_says_it_is_a_proxy():
    data = json.loads((PERF / "RESULTS-quick.json").read_text())
    assert "ISA capped" not in report.render(data)
    capped = copy.deepcopy(data)
    capped["isa_cap"] = "AVX2"
    text = report.render(capped)
    assert "**ISA capped to AVX2: a proxy, not a machine limited to AVX2.**" in text
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in text
