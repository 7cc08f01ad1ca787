"""The docstring examples of every unilens module run and print what they say (doctest)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import unilens

# every module of every tier (walk_packages recurses into the subpackages; iter_modules would stop at their names)
MODULES = sorted(m.name for m in pkgutil.walk_packages(unilens.__path__, "unilens.") if not m.name.endswith("__main__"))


def test_every_tier_is_walked():
    assert {"unilens.core.names", "unilens.arch.discovery", "unilens.model.transformer", "unilens.ui.cli"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} docstring examples in {name} failed"
