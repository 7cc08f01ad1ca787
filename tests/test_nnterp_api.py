"""Completeness: every public name of nnterp 1.3 (docs/nnterp-api.json, made by bench/nnterp_api.py from the installed
nnterp) exists in unilens under the same module path, with compatible parameters (names, positions, defaults)."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import pytest

API = json.loads((Path(__file__).resolve().parents[1] / "docs" / "nnterp-api.json").read_text())

# Deliberate differences, each with its reason (docs/coming-from-nnterp.md repeats them). Key: "module:Name.param".
ALLOWED = {
    # unilens takes a tokenizer as second positional (a loaded model needs one); nnterp's positional order after
    # `model` is trust_remote_code, check_renaming, ...: every nnterp option is still accepted by keyword.
    "nnterp.standardized_transformer:StandardizedTransformer.*position*": "tokenizer= is unilens's 2nd positional",
    "nnterp:StandardizedTransformer.*position*": "tokenizer= is unilens's 2nd positional",
    # nnterp's default is device_map="auto" via kwargs; not a parameter.
}


def _unilens_module(name: str):
    return importlib.import_module("unilens" + name[len("nnterp"):])


def _params(obj) -> list[inspect.Parameter]:
    sig = inspect.signature(obj)
    return [p for p in sig.parameters.values() if p.name not in ("self", "cls")]


def _check_params(where: str, nnterp_params: list[dict] | None, obj, gaps: list[str]) -> None:
    if nnterp_params is None:
        return
    try:
        ours = _params(obj)
    except (TypeError, ValueError):
        gaps.append(f"{where}: no inspectable signature")
        return
    by_name = {p.name: p for p in ours}
    positional = [p.name for p in ours if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    theirs_positional = [p["name"] for p in nnterp_params if p["kind"] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD")]
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in ours)
    for spec in nnterp_params:
        name, kind = spec["name"], spec["kind"]
        if kind in ("VAR_POSITIONAL", "VAR_KEYWORD"):
            if kind == "VAR_KEYWORD" and not has_var_kw:
                gaps.append(f"{where}: nnterp accepts **{name}, unilens does not")
            continue
        if name not in by_name:
            gaps.append(f"{where}: parameter {name!r} missing")
            continue
        ours_p = by_name[name]
        if kind == "POSITIONAL_OR_KEYWORD":
            index = theirs_positional.index(name)
            if (index >= len(positional) or positional[index] != name) and f"{where}.*position*" not in ALLOWED:
                gaps.append(f"{where}: parameter {name!r} is positional #{index} in nnterp, "
                            f"#{positional.index(name) if name in positional else 'keyword-only'} in unilens")
        if "default" in spec:
            if ours_p.default is inspect.Parameter.empty:
                gaps.append(f"{where}: parameter {name!r} has nnterp default {spec['default']!r}, none in unilens")
            elif ours_p.default != spec["default"] and f"{where}.{name}" not in ALLOWED:
                gaps.append(f"{where}: parameter {name!r} default {ours_p.default!r} != nnterp's {spec['default']!r}")
        elif "default_repr" in spec and ours_p.default is inspect.Parameter.empty:
            gaps.append(f"{where}: parameter {name!r} has a default in nnterp ({spec['default_repr']}), none in unilens")


def _check_entry(module_name: str, name: str, entry: dict) -> list[str]:
    gaps: list[str] = []
    where = f"{module_name}:{name}"
    try:
        module = _unilens_module(module_name)
    except ImportError as err:
        return [f"{where}: module unilens{module_name[len('nnterp'):]} missing ({err})"]
    if not hasattr(module, name):
        return [f"{where}: missing"]
    obj = getattr(module, name)
    kind = entry["kind"]
    if kind in ("class", "exception"):
        if not inspect.isclass(obj):
            return [f"{where}: nnterp's is a class, unilens's is {type(obj).__name__}"]
        if kind == "exception" and not issubclass(obj, Exception):
            gaps.append(f"{where}: not an Exception subclass")
        if kind == "class" and entry.get("params") is not None and name not in ("IOType",):
            _check_params(where, entry["params"], obj, gaps)
        for member, spec in entry.get("members", {}).items():
            mwhere = f"{where}.{member}"
            if member == "__init__":
                continue
            if spec["kind"] in ("field", "attribute"):
                fields = getattr(obj, "__dataclass_fields__", {})
                if member not in fields and not hasattr(obj, member) and member not in getattr(obj, "__annotations__", {}):
                    gaps.append(f"{mwhere}: attribute missing")
                continue
            if not hasattr(obj, member):
                gaps.append(f"{mwhere}: missing")
                continue
            raw = inspect.getattr_static(obj, member)
            if spec["kind"] == "property":
                if not isinstance(raw, property):
                    gaps.append(f"{mwhere}: nnterp's is a property, unilens's is {type(raw).__name__}")
                elif spec["settable"] and raw.fset is None:
                    gaps.append(f"{mwhere}: settable in nnterp, read-only in unilens")
                continue
            target = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
            if spec["kind"] in ("staticmethod", "classmethod") and not isinstance(raw, (staticmethod, classmethod)):
                gaps.append(f"{mwhere}: a {spec['kind']} in nnterp, a {type(raw).__name__} in unilens")
            if callable(target):
                _check_params(mwhere, spec.get("params"), target, gaps)
            else:
                gaps.append(f"{mwhere}: not callable")
    elif kind == "function":
        if not callable(obj):
            return [f"{where}: not callable"]
        _check_params(where, entry["params"], obj, gaps)
    return gaps


ENTRIES = [(m, n, e) for m, names in API["modules"].items() for n, e in sorted(names.items())]


@pytest.mark.parametrize("module_name,name,entry", ENTRIES, ids=[f"{m}:{n}" for m, n, _ in ENTRIES])
def test_nnterp_name_exists_with_compatible_signature(module_name, name, entry):
    gaps = _check_entry(module_name, name, entry)
    assert not gaps, "\n".join(gaps)


def test_listing_is_nnterp_1_3():
    assert API["nnterp_version"].startswith("1.3"), API["nnterp_version"]
    assert sum(len(v) for v in API["modules"].values()) >= 70


def test_the_check_finds_a_gap():
    """The checker itself: a missing name, a renamed parameter and a changed default are each reported."""
    entry = {"kind": "function", "params": [{"name": "words", "kind": "POSITIONAL_OR_KEYWORD", "default": None}]}
    assert _check_entry("nnterp.interventions", "no_such_function", entry) == ["nnterp.interventions:no_such_function: missing"]
    fake = {"kind": "function", "params": [{"name": "wordz", "kind": "POSITIONAL_OR_KEYWORD", "default": None}]}
    assert "missing" in _check_entry("nnterp.interventions", "repeat_prompt", fake)[0]
    changed = {"kind": "function", "params": [{"name": "words", "kind": "POSITIONAL_OR_KEYWORD", "default": 3}]}
    assert "default" in _check_entry("nnterp.interventions", "repeat_prompt", changed)[0]
