"""The server is part of the torch-free install: importing it (and building the app) loads no torch & co."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the server extra")

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("torch", "diffusers", "transformers", "optimum", "onnx", "leansd.export")


def test_server_imports_no_torch():
    code = ("import sys, leansd.server.app, leansd.server.cli, leansd.server.worker; "
            f"print([m for m in {FORBIDDEN!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""}).stdout.strip()
    assert out == "[]"
