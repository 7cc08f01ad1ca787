"""List nnterp's public API (names + signatures per module) into docs/nnterp-api.json.

Run with the anchors virtualenv, where nnterp 1.3 is installed:

    bench/.venv-anchors/bin/python bench/nnterp_api.py

A name is public when a module defines it at its top level (def, class, or assignment: read from the module's
source with ``ast``, so re-exported imports are not counted) and it does not start with ``_``; for the package
itself, the names its ``__init__`` exports. For a class, its public methods / properties (defined in the class
body) and dataclass fields are listed too. ``tests/test_nnterp_api.py`` checks every listed name against unilens.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import sys
from pathlib import Path

MODULES = [
    "nnterp",
    "nnterp.nnsight_utils",
    "nnterp.interventions",
    "nnterp.prompt_utils",
    "nnterp.rename_utils",
    "nnterp.standardized_transformer",
    "nnterp.display",
]
# Not listed: nnterp.utils / nnterp.logging (internal helpers: version-dependent imports, a logger) and
# nnterp.__main__ (its command line): docs/coming-from-nnterp.md says why.

OUT = Path(__file__).resolve().parents[1] / "docs" / "nnterp-api.json"


def _default(value):
    if value is inspect.Parameter.empty:
        return {"required": True}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"default": value}
    return {"default_repr": repr(value)}


def _signature(obj) -> list[dict] | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = []
    for p in sig.parameters.values():
        if p.name in ("self", "cls"):
            continue
        params.append({"name": p.name, "kind": p.kind.name, **_default(p.default)})
    return params


def _top_level_names(module) -> list[str]:
    tree = ast.parse(Path(module.__file__).read_text())
    names = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
    return [n for n in dict.fromkeys(names) if not n.startswith("_")]


def _class_members(cls) -> dict:
    members = {}
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in ("__init__", "__len__", "__getitem__", "__iter__", "__call__",
                                                  "__setitem__"):
            continue
        if isinstance(value, property):
            members[name] = {"kind": "property", "settable": value.fset is not None}
        elif isinstance(value, (staticmethod, classmethod)):
            members[name] = {"kind": type(value).__name__, "params": _signature(value.__func__)}
        elif inspect.isfunction(value):
            members[name] = {"kind": "method", "params": _signature(value)}
    for name in getattr(cls, "__annotations__", {}):
        if not name.startswith("_") and name not in members:
            members[name] = {"kind": "attribute"}
    if dataclasses.is_dataclass(cls):
        for f in dataclasses.fields(cls):
            members[f.name] = {"kind": "field"}
    return members


def _import(module_name: str):
    """Import a module; optional plotting dependencies missing here (plotly) are stubbed: only signatures are read."""
    import types

    for _ in range(5):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            missing = err.name
            if not missing or not missing.split(".")[0] in ("plotly", "kaleido"):
                raise
            parts = missing.split(".")
            for k in range(1, len(parts) + 1):
                stub = types.ModuleType(".".join(parts[:k]))
                stub.__path__ = []  # a package, so submodules import

                def placeholder(name):  # any public attribute: a placeholder class
                    if name.startswith("__"):
                        raise AttributeError(name)
                    return type(name, (), {})

                stub.__getattr__ = placeholder
                sys.modules.setdefault(".".join(parts[:k]), stub)
    return importlib.import_module(module_name)


def describe(module_name: str) -> dict:
    module = _import(module_name)
    names = list(module.__all__) if module_name == "nnterp" else _top_level_names(module)
    entries = {}
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj):
            kind = "exception" if issubclass(obj, BaseException) else "class"
            entries[name] = {"kind": kind, "params": _signature(obj), "members": _class_members(obj)}
        elif callable(obj) and (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            entries[name] = {"kind": "function", "params": _signature(obj)}
        else:
            entries[name] = {"kind": "value", "type": type(obj).__name__}
    return entries


def main() -> None:
    from importlib.metadata import version

    import nnterp  # noqa: F401  (the anchors virtualenv)

    api = {
        "nnterp_version": version("nnterp"),
        "python": sys.version.split()[0],
        "modules": {name: describe(name) for name in MODULES},
    }
    OUT.write_text(json.dumps(api, indent=1, sort_keys=True) + "\n")
    total = sum(len(v) for v in api["modules"].values())
    print(f"wrote {OUT} ({total} names in {len(MODULES)} modules)")


if __name__ == "__main__":
    main()
