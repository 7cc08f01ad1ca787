"""The architecture, enforced (issue 23; docs/architecture.md).

- no import cycle among unilens's modules, on grimp's import graph (function-level and ``TYPE_CHECKING`` imports
  included), and the check finds a planted one;
- ``lint-imports`` keeps the tiers of pyproject.toml's ``[tool.importlinter]`` (also run by ``make test``);
- nothing inside the package imports the public face (``unilens/__init__.py``) or an alias path of MODULE_ALIASES,
  the two import forms grimp cannot see through;
- every import path named in README.md and docs/*.md, every path of nnterp 1.3's documented API
  (docs/nnterp-api.json) and every MODULE_ALIASES entry resolves;
- no code below ``unilens.model`` names ``StandardizedTransformer`` (it types against ``core.protocol.StandardizedModel``).
"""

from __future__ import annotations

import ast
import functools
import importlib
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import grimp

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter's own TOML reader
    import tomli as tomllib

# unilens itself is imported inside the tests that need it: the graph checks parse the source and run even when
# an import of the package fails

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "unilens"
IMPORTLINTER = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
# the tiers, highest first: the one list, pyproject.toml's layers contract
TIERS: list[str] = next(c for c in IMPORTLINTER["contracts"] if c["type"] == "layers")["layers"]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# --------------------------------------------------------------------------------------------------- import cycles


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of a directed graph, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def _cycle_through(first: str, component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """The shortest closed chain first -> ... -> first inside one strongly connected component (breadth first)."""
    parents: dict[str, str] = {}
    frontier = [first]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(edges[node] & component):
                if nxt == first:
                    chain = [node]
                    while chain[-1] != first:
                        chain.append(parents[chain[-1]])
                    return [first, *reversed(chain[:-1]), first] if node != first else [first, first]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{first} is in a strongly connected component but on no cycle")  # cannot happen


def import_cycles(package: str, exclude: frozenset[str] = frozenset()) -> list[str]:
    """Every import cycle among `package`'s modules: one entry per strongly connected component, a shortest cycle
    in it with the import lines, and the component's other imports.

    grimp's graph: module-level, function-level (lazy) and ``TYPE_CHECKING`` imports all count, and so does a
    package's ``__init__`` re-export (``from .lens import logit_lens`` is an edge pkg -> pkg.lens).

        >>> import_cycles("json")  # the standard library's json package: acyclic
        []
    """
    graph = grimp.build_graph(package, include_external_packages=False, cache_dir=None)
    modules = set(graph.modules) - exclude
    edges = {m: graph.find_modules_directly_imported_by(m) & modules for m in modules}
    found = []
    for component in _strongly_connected(edges):
        if len(component) == 1 and component[0] not in edges[component[0]]:
            continue
        chain = _cycle_through(component[0], set(component), edges)
        steps = []
        for importer, imported in itertools.pairwise(chain):
            lines = graph.get_import_details(importer=importer, imported=imported)
            where = "; ".join(f"l.{d['line_number']} {d['line_contents']}" for d in lines)
            steps.append(f"    {importer} -> {imported}   ({where})")
        shown = set(itertools.pairwise(chain))
        others = [f"{m} -> {n}" for m in component for n in sorted(edges[m] & set(component)) if (m, n) not in shown]
        also = f"\n  other imports inside it: {', '.join(others)}" if others else ""
        found.append(f"cycle of {len(component)} modules {component}:\n" + "\n".join(steps) + also)
    return found


def test_no_import_cycle():
    # unilens/__init__.py is the public face: it imports every tier (and registers MODULE_ALIASES), so it is a node
    # above everything, left out of the cycle check. Nothing inside the package may import it (next test), so no
    # cycle can pass through it.
    cycles = import_cycles("unilens", exclude=frozenset({"unilens"}))
    assert not cycles, "import cycles among unilens's modules:\n" + "\n".join(cycles)


def _plant(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_cycle_check_finds_planted_cycles(tmp_path, monkeypatch):
    """The same checker on a tiny package with three planted cycles, each hidden one way: a function-level import,
    a ``TYPE_CHECKING`` import, and a subpackage ``__init__`` re-export; an acyclic module beside them is not reported."""
    _plant(tmp_path, {
        "plantedcycle/__init__.py": "",
        # 1: a module-level import one way, a lazy one back
        "plantedcycle/a.py": "from plantedcycle import b\n",
        "plantedcycle/b.py": "def f():\n    from plantedcycle.a import g  # lazy\n    return g\n",
        # 2: a type-only import back
        "plantedcycle/c.py": "from .d import D\n",
        "plantedcycle/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import C\nclass D: ...\n",
        # 3: the subpackage re-exports a module that imports the subpackage
        "plantedcycle/sub/__init__.py": "from .inner import x\n",
        "plantedcycle/sub/inner.py": "from plantedcycle.sub import y\nx = 1\n",
        "plantedcycle/clean.py": "from plantedcycle import a\n",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    cycles = import_cycles("plantedcycle")
    text = "\n".join(cycles)
    assert len(cycles) == 3, text
    assert "['plantedcycle.a', 'plantedcycle.b']" in text and "(l.2 from plantedcycle.a import g" in text, text
    assert "['plantedcycle.c', 'plantedcycle.d']" in text and "(l.3 from .c import C)" in text, text
    assert "['plantedcycle.sub', 'plantedcycle.sub.inner']" in text, text
    assert "plantedcycle.clean" not in text, text
    # and the real test's exclusion of a root package does not hide a cycle below it
    assert len(import_cycles("plantedcycle", exclude=frozenset({"plantedcycle"}))) == 3


# ------------------------------------------------------------------------------------------------------ the tiers


def test_lint_imports_keeps_the_tiers():
    """pyproject.toml's import-linter contracts (the layers, and no runtime use of unilens.testing) are kept."""
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from importlinter.cli import lint_imports_command as c; c()"]
    run = subprocess.run([*command, "--no-cache"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"lint-imports failed (exit {run.returncode}):\n{run.stdout}\n{run.stderr}"


def test_the_layers_contract_names_every_tier():
    """Every subpackage of unilens is a tier of the layers contract (a new subpackage must be placed in it)."""
    subpackages = {f"unilens.{p.parent.name}" for p in PACKAGE.glob("*/__init__.py")}
    assert subpackages == set(TIERS), f"subpackages {sorted(subpackages)} vs. layers {TIERS}"
    assert IMPORTLINTER.get("exclude_type_checking_imports", False) in (False, "false", "False")


@functools.cache  # the source does not change during a test run
def _sources() -> dict[str, ast.Module]:
    """Every module of the package, parsed: dotted name -> tree."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _imports(module: str, tree: ast.Module) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module imported from, names) for every import statement of a module, at any depth."""
    package = module if (PACKAGE / Path(*module.split(".")[1:]) / "__init__.py").exists() else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            out.append((node.lineno, source, [alias.name for alias in node.names]))
    return out


def _module_aliases(init: ast.Module) -> dict[str, str]:
    """MODULE_ALIASES read from unilens/__init__.py's source (so this check runs even where importing unilens fails)."""
    for node in init.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "MODULE_ALIASES" for t in targets):
                return ast.literal_eval(node.value)
    raise AssertionError("unilens/__init__.py defines no MODULE_ALIASES")


def test_nothing_inside_imports_the_public_face_or_an_alias():
    """The package's own modules import from the module that owns a name, never from ``unilens`` (its __init__
    imports every tier: importing it from inside is a cycle, and an upward import whatever the tier) nor through an
    alias path of MODULE_ALIASES (``unilens.cache``, ...: grimp and lint-imports cannot see where those lead)."""
    sources = _sources()
    aliases = {f"unilens.{old}" for old in _module_aliases(sources["unilens"])}
    bad = []
    for module, tree in sources.items():
        if module == "unilens":
            continue
        for line, source, names in _imports(module, tree):
            # ``from unilens import core`` names a real module, not the public face; ``from .. import x`` any other x is
            if source == "unilens" and (not names or any(f"unilens.{n}" not in sources for n in names)):
                shown = f"from unilens import {', '.join(names)}" if names else "import unilens"
                bad.append(f"{module} l.{line}: {shown}")
            elif source in aliases or any(source.startswith(a + ".") for a in aliases):
                bad.append(f"{module} l.{line}: imports the alias {source}")
    assert not bad, "import from the module that owns the name instead:\n" + "\n".join(bad)


def test_nothing_below_the_model_names_standardized_transformer():
    """core, arch, hooks and compat type against ``unilens.core.protocol.StandardizedModel``: no import of
    ``StandardizedTransformer`` (at any depth, type-only included), no ``x.StandardizedTransformer``, no annotation
    naming it. Docstrings may (their runnable examples build one)."""
    below = TIERS[TIERS.index("unilens.model") + 1:]
    bad = []
    for module, tree in _sources().items():
        if not any(module == tier or module.startswith(tier + ".") for tier in below):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and any(a.name == "StandardizedTransformer" for a in node.names):
                bad.append(f"{module} l.{node.lineno}: imports StandardizedTransformer")
            elif isinstance(node, ast.Attribute) and node.attr == "StandardizedTransformer":
                bad.append(f"{module} l.{node.lineno}: uses .StandardizedTransformer")
            annotations = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                arguments = node.args
                annotations = [a.annotation for a in [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                                                      arguments.vararg, arguments.kwarg] if a is not None]
                annotations.append(node.returns)
            elif isinstance(node, ast.AnnAssign):
                annotations = [node.annotation]
            for annotation in filter(None, annotations):
                if "StandardizedTransformer" in ast.unparse(annotation):
                    bad.append(f"{module} l.{annotation.lineno}: annotation {ast.unparse(annotation)}")
    assert not bad, "type against unilens.core.protocol.StandardizedModel:\n" + "\n".join(sorted(set(bad)))


# --------------------------------------------------------------------------------------------------- public paths


def _resolve(path: str) -> object:
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # the module exists but something it imports does not
                raise
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(path)


_FROM = re.compile(r"^[ \t]*(?:(?:>>>|\.\.\.)[ \t]+)?from[ \t]+(unilens(?:\.\w+)*)[ \t]+import[ \t]+(\([^)]*\)|[^\n#]+)",
                   re.MULTILINE)
_IMPORT = re.compile(r"^[ \t]*(?:>>>[ \t]+)?import[ \t]+(unilens(?:\.\w+)*)", re.MULTILINE)
_DOTTED = re.compile(r"(?<![\w./-])unilens(?:\.[A-Za-z_]\w*)+")


def documented_paths(text: str) -> tuple[set[tuple[str, str]], set[str]]:
    """(from-imports as (module, name), dotted paths) named in a markdown text: code and prose alike.

        >>> imports, dotted = documented_paths("from unilens.tl import (\\n  hook_names,\\n)\\nsee `unilens.cache.Store`.")
        >>> imports, sorted(dotted)
        ({('unilens.tl', 'hook_names')}, ['unilens.cache.Store', 'unilens.tl'])
    """
    imports = set()
    for match in _FROM.finditer(text):
        for name in match.group(2).strip().strip("()").replace("\\\n", " ").split(","):
            if name.strip():
                imports.add((match.group(1), name.split()[0]))
    return imports, {m.group(1) for m in _IMPORT.finditer(text)} | set(_DOTTED.findall(text))


def test_every_documented_path_imports():
    """Every ``from unilens... import a, b`` and every ``unilens.x.y`` named in README.md and docs/*.md resolves."""
    failures = []
    count = 0
    for doc in DOCS:
        imports, dotted = documented_paths(doc.read_text())
        for module, name in sorted(imports):
            count += 1
            try:
                exec(f"from {module} import {name}", {})
            except Exception as err:  # noqa: BLE001 -- every failure is listed
                failures.append(f"{doc.relative_to(ROOT)}: from {module} import {name}: {type(err).__name__}: {err}")
        for path in sorted(dotted):
            count += 1
            try:
                _resolve(path)
            except Exception as err:  # noqa: BLE001
                failures.append(f"{doc.relative_to(ROOT)}: {path}: {type(err).__name__}: {err}")
    assert count > 50, f"only {count} paths found in {[d.name for d in DOCS]}: is the extraction broken?"
    assert not failures, "documented import paths that do not resolve:\n" + "\n".join(failures)


def test_every_nnterp_documented_path_imports():
    """``import unilens as nnterp``: every module of nnterp 1.3's documented API (docs/nnterp-api.json) is reachable
    as an attribute and by import, and has every name nnterp documents there (signatures: test_nnterp_api.py)."""
    api = json.loads((ROOT / "docs" / "nnterp-api.json").read_text())
    assert api["nnterp_version"].startswith("1.3"), api["nnterp_version"]
    import unilens as nnterp

    failures = []
    for nnterp_module, names in sorted(api["modules"].items()):
        assert nnterp_module.split(".")[0] == "nnterp", nnterp_module
        path = "unilens" + nnterp_module[len("nnterp"):]
        try:
            module = importlib.import_module(path)
            exec(f"import {path}", {})
        except Exception as err:  # noqa: BLE001
            failures.append(f"{nnterp_module}: import {path}: {type(err).__name__}: {err}")
            continue
        attribute = nnterp
        for part in nnterp_module.split(".")[1:]:
            attribute = getattr(attribute, part, None)
        if attribute is not module:
            failures.append(f"{nnterp_module}: nnterp.{nnterp_module[len('nnterp.'):]} is not the module {path}")
        for name in sorted(names):
            if not hasattr(module, name):
                failures.append(f"{nnterp_module}: {path} has no {name}")
            try:
                exec(f"from {path} import {name}", {})
            except Exception as err:  # noqa: BLE001
                failures.append(f"{nnterp_module}: from {path} import {name}: {type(err).__name__}: {err}")
    assert len(api["modules"]) >= 7 and {"nnterp.nnsight_utils", "nnterp.interventions", "nnterp.prompt_utils",
                                         "nnterp.rename_utils", "nnterp.standardized_transformer"} <= set(api["modules"])
    assert not failures, "nnterp 1.3 paths that do not resolve:\n" + "\n".join(failures)


def test_module_aliases_are_the_modules_they_name():
    """Every MODULE_ALIASES entry: ``unilens.<old>`` imports, is the module ``unilens.<new>`` (the same object, so
    state and monkeypatching are shared), and is the attribute ``unilens.<old>``."""
    import unilens

    failures = []
    for old, new in sorted(unilens.MODULE_ALIASES.items()):
        try:
            target = importlib.import_module(f"unilens.{new}")
            alias = importlib.import_module(f"unilens.{old}")
            exec(f"import unilens.{old}", {})
        except Exception as err:  # noqa: BLE001
            failures.append(f"unilens.{old} -> unilens.{new}: {type(err).__name__}: {err}")
            continue
        if alias is not target or getattr(unilens, old) is not target or sys.modules[f"unilens.{old}"] is not target:
            failures.append(f"unilens.{old} is not the module unilens.{new}")
    assert not failures, "\n".join(failures)
