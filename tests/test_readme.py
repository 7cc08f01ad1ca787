"""Every Python example in README.md and docs/*.md runs as written (a user copies them first).

Each file's ```python blocks run in order, in one fresh process (so later blocks see earlier names, as in a session),
from a script file (nnsight reads a trace body's source from its file) in a temporary directory (examples write
files such as lens.html there). The README's quick start must also print ' Paris' on its own.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def _run(code: str, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    script = tmp_path / name
    script.write_text(code)
    return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("doc", [d for d in DOCS if python_blocks(d)], ids=lambda d: str(d.relative_to(ROOT)))
def test_every_example_runs(doc, tmp_path):
    result = _run("\n\n".join(python_blocks(doc)), tmp_path, "examples.py")
    assert result.returncode == 0, f"{doc.name} examples failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def test_readme_quick_start_prints_paris(tmp_path):
    quick_start = python_blocks(ROOT / "README.md")[0]
    result = _run(quick_start, tmp_path, "quick_start.py")
    assert result.returncode == 0, result.stderr[-5000:]
    assert result.stdout.splitlines()[-1] == " Paris", result.stdout[-500:]
