"""The server is part of the torch-free install: importing every server module loads no torch & co."""
from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the server extra")

import leansd.server  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "diffusers", "transformers", "optimum", "onnx")


def test_server_imports_no_torch():
    modules = [info.name for info in pkgutil.walk_packages(leansd.server.__path__, prefix="leansd.server.")
               if info.name != "leansd.server.__main__"]
    assert "leansd.server.app" in modules and "leansd.server.worker" in modules
    code = (f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m.startswith('leansd.export')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}).stdout.strip()
    assert out == "[]"
