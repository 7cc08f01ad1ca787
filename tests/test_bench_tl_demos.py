"""Smoke test of bench/tl_demos.py's cell preparation, on a synthetic notebook (no TransformerLens needed).

The harness runs TransformerLens's demo notebooks with only the model-loading statement changed; if its cell
extraction, magic stripping or loading-line replacement rotted, its counts would silently stop meaning that.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_HARNESS = Path(__file__).resolve().parent.parent / "bench" / "tl_demos.py"


@pytest.fixture(scope="module")
def demos():
    spec = importlib.util.spec_from_file_location("unilens_bench_tl_demos", _HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _notebook(*cells: tuple[str, str]) -> dict:
    return {"cells": [{"cell_type": kind, "source": source.splitlines(keepends=True), "metadata": {}}
                      for kind, source in cells], "nbformat": 4}  # fmt: skip


SYNTHETIC = _notebook(
    ("markdown", "# A demo\nmodel = TransformerBridge.boot_transformers('not code')"),
    ("code", "import os\ntry:\n    import google.colab\n    %pip install transformer_lens\nexcept ImportError:\n    pass"),
    ("code", "# NBVAL_IGNORE_OUTPUT\nmodel = TransformerBridge.boot_transformers(\n    \"gpt2\",\n    device=device,\n)\n"
             "model.enable_compatibility_mode()"),
    ("code", 'if MODEL_PATH:\n    hf = load(MODEL_PATH)\n    big = HookedTransformer.from_pretrained(MODEL_NAME, fold_ln=True)\n'
             'doc = """\n>>> model = TransformerBridge.boot_transformers("gpt2")\n"""'),
    ("code", "# NBVAL_SKIP\nfor layer in range(12):\n    pass"),
    ("code", "!ls\n%%capture\nx = model(tokens, return_type='loss')"),
)  # fmt: skip


def test_cells_are_the_code_cells_in_order(demos):
    cells = demos.code_cells(SYNTHETIC)
    assert len(cells) == 5
    assert cells[0].startswith("import os") and cells[-1].endswith("return_type='loss')")


def test_magics_become_pass_at_their_indentation(demos):
    cells = demos.prepare_cells(SYNTHETIC, "synthetic")
    assert "    pass\nexcept ImportError" in cells[0]["source"]
    assert "%" not in cells[0]["source"]
    assert cells[4]["source"].split("\n")[:2] == ["pass", "pass"]
    for cell in cells:
        compile(cell["source"], f"cell {cell['index']}", "exec")  # every prepared cell is valid Python


def test_only_the_loading_statements_are_replaced(demos):
    cells = demos.prepare_cells(SYNTHETIC, "synthetic")
    loading = cells[1]
    assert loading["source"] == ("# NBVAL_IGNORE_OUTPUT\nmodel = __tl_demos_load__('gpt2')\n"
                                 "model.enable_compatibility_mode()")  # fmt: skip
    assert loading["replaced"] == ['model = TransformerBridge.boot_transformers(\n    "gpt2",\n    device=device,\n)']
    assert loading["first_line"] == "model = TransformerBridge.boot_transformers("  # the original cell's, not a comment
    nested = cells[2]["source"].split("\n")
    assert nested[2] == "    big = __tl_demos_load__(MODEL_NAME)"  # indentation and the name variable kept
    assert nested[1] == "    hf = load(MODEL_PATH)"  # another call is left alone
    assert '>>> model = TransformerBridge.boot_transformers("gpt2")' in cells[2]["source"]  # inside a string: kept
    assert cells[0]["replaced"] == [] and cells[4]["replaced"] == []


def test_nbval_skip_cells_are_marked_unless_included(demos):
    assert [c["skip"] for c in demos.prepare_cells(SYNTHETIC, "synthetic")] == [None, None, None, "NBVAL_SKIP", None]
    assert all(c["skip"] is None for c in demos.prepare_cells(SYNTHETIC, "synthetic", include_skipped=True))


def test_slow_cells_are_skipped_unless_included(demos, monkeypatch):
    monkeypatch.setattr(demos, "SLOW", [("synthetic", 4, "a sweep")])
    assert demos.prepare_cells(SYNTHETIC, "synthetic")[4]["skip"] == "slow: a sweep"
    assert demos.prepare_cells(SYNTHETIC, "synthetic", include_slow=True)[4]["skip"] is None
    assert demos.prepare_cells(SYNTHETIC, "other")[4]["skip"] is None  # per notebook


def test_caps_apply_and_fail_loudly_when_stale(demos, monkeypatch):
    monkeypatch.setattr(demos, "CAPS", [("synthetic", 3, "range(12)", "range(3)", "why")])
    assert "range(3)" in demos.prepare_cells(SYNTHETIC, "synthetic")[3]["source"]
    monkeypatch.setattr(demos, "CAPS", [("synthetic", 3, "range(99)", "range(3)", "why")])
    with pytest.raises(ValueError, match="no longer contains"):
        demos.prepare_cells(SYNTHETIC, "synthetic")


def test_results_section_is_replaced_in_place(demos, tmp_path):
    cell_ok = {"index": 0, "first_line": "x", "status": "ok"}
    cell_bad = {"index": 1, "first_line": "y = model.cfg", "status": "error",
                "error": {"type": "AttributeError", "message": "no cfg", "cell_line": "y = model.cfg", "cell_lineno": 1}}
    data = {"meta": {"date": "today"},
            "notebooks": {"synthetic": {"total": 2, "skipped": 0,
                                        "bridge": {"cells": [cell_ok, dict(cell_ok, index=1)]},
                                        "unilens": {"cells": [cell_ok, cell_bad]}}}}  # fmt: skip
    section = demos.render_section([(data, "x.json")], ["synthetic"])
    assert "| synthetic | 2 | 0 | 2 | 1 | **no** |" in section
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n\nkept above\n")
    demos.write_results_md(section, results)
    demos.write_results_md(section.replace("today", "tomorrow"), results)
    text = results.read_text()
    assert text.count(demos.MARK_BEGIN) == 1 and "tomorrow" in text and "today" not in text
    assert text.startswith("# results\n\nkept above\n")
    notes = demos.render_notes(data)
    assert "cell 1 `y = model.cfg`" in notes and "**AttributeError**: no cfg" in notes and "bridge: ok" in notes
    json.dumps(data)  # the records stay JSON-serialisable
