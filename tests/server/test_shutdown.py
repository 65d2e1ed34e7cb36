"""sd-serve as a process: it starts on the bundled model, and SIGINT/SIGTERM stop the running job, answer the
waiting requests and exit cleanly."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.server.conftest import call, wait_until

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_jobs_and_exits_cleanly(sig):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LEANSD_SERVE_STEP_DELAY": "0.1"}
    process = subprocess.Popen([sys.executable, "-m", "leansd.server", "--port", str(port)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is None and _up(url), timeout=60, what="sd-serve to start")
        replies = {}
        waiting = threading.Thread(target=lambda: replies.setdefault("a1111", call(
            "POST", f"{url}/sdapi/v1/txt2img", {"prompt": "a circle", "steps": 100, "width": 64, "height": 64})), daemon=True)
        waiting.start()
        call("POST", f"{url}/api/jobs", {"prompt": "a circle", "steps": 5})  # queued behind it: cancelled
        wait_until(lambda: call("GET", f"{url}/sdapi/v1/progress").json()["state"]["sampling_step"] >= 1, what="the job to run")
        process.send_signal(sig)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        waiting.join(10)
        assert replies["a1111"].status == 200 and replies["a1111"].json()["images"] == []
        assert "Traceback" not in output, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _up(url: str) -> bool:
    try:
        return call("GET", f"{url}/api/models", timeout=2).status == 200
    except OSError:
        return False


def test_refuses_a_missing_model_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "leansd.server", "--model", str(tmp_path / "nope")], capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_refuses_two_folders_with_one_name(tmp_path, second_model):
    twin = tmp_path / "again" / "second"
    twin.parent.mkdir()
    twin.symlink_to(second_model)
    result = subprocess.run([sys.executable, "-m", "leansd.server", "--model", str(second_model), "--model", str(twin)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert result.returncode == 2 and "two model folders are named 'second'" in result.stderr
