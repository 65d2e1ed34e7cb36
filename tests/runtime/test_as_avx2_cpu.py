"""scripts/as-avx2-cpu.sh: a command run through it sees an AVX2-only CPU everywhere leansd looks (the kernel's flags,
OpenVINO's capabilities, numpy's dispatch), and `precision="auto"` on OpenVINO turns bf16 down on the bundled
model for want of it. Runs where the script can (root, x86-64, QEMU 10 or newer's user-mode emulator installed, mount namespaces allowed;
`--check` says); skipped elsewhere."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "as-avx2-cpu.sh"


def _cannot_run() -> str:
    """Why the script cannot run commands here ("" when it can): its --check looks at the machine, QEMU's version, root and mount namespaces."""
    if platform.machine() != "x86_64" or not shutil.which("bash"):
        return "needs an x86-64 machine with bash"
    done = subprocess.run([str(SCRIPT), "--check"], capture_output=True, text=True)
    return "" if done.returncode == 0 else done.stderr.strip()


REASON = _cannot_run()
pytestmark = pytest.mark.skipif(bool(REASON), reason=REASON)

PROBE = """
import json
from numpy._core._multiarray_umath import __cpu_features__ as numpy_features
import leansd
from leansd.runtime import cpu_features
seen = cpu_features.detect()
pipe = leansd.load(backend="openvino", precision="auto")
print(json.dumps({"bf16": seen.bf16, "int8_dot": seen.int8_dot, "openvino_bf16": cpu_features.openvino_bf16(),
                  "numpy_avx2": numpy_features["AVX2"], "numpy_avx512f": numpy_features["AVX512F"],
                  "precision": pipe.precision, "reason": pipe.precision_reason}))
"""


def test_the_command_sees_an_avx2_only_cpu_and_auto_precision_follows():
    done = subprocess.run([str(SCRIPT), sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["numpy_avx2"] and not seen["numpy_avx512f"]
    assert not seen["bf16"] and not seen["int8_dot"] and not seen["openvino_bf16"]
    assert seen["precision"] != "bf16" and "this CPU has no native bfloat16 arithmetic" in seen["reason"], seen


def test_a_script_is_refused_with_the_fix():
    done = subprocess.run([str(SCRIPT), str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "name its interpreter" in done.stderr


TANH = """
import numpy as np, openvino as ov, openvino.opset13 as ops
x = np.linspace(-4, 4, 64, dtype=np.float32).reshape(1, 4, 4, 4)
p = ops.parameter([1, 4, 4, 4], np.float32)
compiled = ov.Core().compile_model(ov.Model([ops.tanh(p)], [p]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
print(float(np.abs(compiled({0: x})[0] - np.tanh(x)).max()))
"""


def test_the_emulator_runs_openvinos_avx2_kernels_right():
    """Emulated results count only if the emulator computes AVX2 code right: QEMU 7.2 got this static-shape Tanh
    (OpenVINO's JIT kernel) wrong by up to 0.9, which made an OpenVINO parity test fail for the emulator's sake."""
    done = subprocess.run([str(SCRIPT), sys.executable, "-c", TANH], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-6
