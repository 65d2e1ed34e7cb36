"""The runtime must never pull in torch or the libraries built on it: it is meant for small installs."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import leansd.runtime

FORBIDDEN = ("torch", "diffusers", "transformers", "optimum", "onnx", "leansd.export")


def runtime_modules() -> list[str]:
    names = ["leansd", "leansd.runtime"]
    for info in pkgutil.walk_packages(leansd.runtime.__path__, prefix="leansd.runtime."):
        names.append(info.name)
    return names


def test_runtime_imports_nothing_heavy():
    modules = runtime_modules()
    assert "leansd.runtime.pipeline" in modules and "leansd.runtime.backends.onnxruntime" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        if exc.name not in ('onnxruntime', 'openvino'):\n"  # a backend may be absent; nothing else may be
        "            raise\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} or m.startswith('leansd.export'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"runtime imported: {result.stdout.strip()}"
