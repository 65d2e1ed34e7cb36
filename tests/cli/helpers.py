"""Running sd-run in a subprocess and checking what it printed and left on disk."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def sd_run(*args: str | bytes, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """Run sd-run; bytes arguments reach it as the raw bytes a shell would pass (e.g. invalid UTF-8)."""
    return subprocess.run([sys.executable, "-m", "leansd.runtime.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, check=False, **kwargs)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, one line on stderr starting `sd-run: error: ` holding every fragment, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sd-run: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `root` (hidden ones too) with its bytes and permission bits, to tell that nothing changed."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            files[str(path.relative_to(root))] = (path.read_bytes(), path.stat().st_mode & 0o7777)
    return files
