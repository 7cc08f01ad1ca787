"""nnterp 1.3.0's own test suite, run against unilens imported as ``nnterp`` on tiny models built here.

    .venv/bin/python bench/nnterp_suite.py                       # every test file, every tiny model
    .venv/bin/python bench/nnterp_suite.py -k steer --json out.json  # extra pytest arguments pass through

The test files are read from the nnterp mirror (the ``v1.3.0`` tag's ``nnterp/tests/``), extracted to a temporary
folder and run **unmodified**. Only nnterp's ``conftest.py`` is replaced (``--noconftest`` plus this module as a
plugin): nnterp's picks its models from the Hub and writes status files into its package. Here:

- ``sys.modules["nnterp"]`` is ``unilens`` and ``nnterp.<sub>`` each module of ``unilens.MODULE_ALIASES``
  (``nnterp.rename_utils`` is ``unilens.compat.nnterp``...), so ``from nnterp.interventions import logit_lens``
  imports unilens's function;
- the hub ids the tests see (``"gpt2"``, ``"yujiepan/llama-2-tiny-random"``...) are tiny random models from
  ``unilens.testing.tiny_model``, saved once into a private Hugging Face cache (``HF_HUB_CACHE``, offline), so both
  ``StandardizedTransformer("gpt2")`` and nnsight's plain ``LanguageModel("gpt2")`` load them by name, exactly as
  the tests write it (some tests branch on the name: ``model_name == "gpt2"``);
- fixtures ``model_name`` (the six models), ``llama_like_model_name`` (those with ``model.layers``), ``model`` and
  ``raw_model`` are nnterp's, minus the Hub bookkeeping.
- two shims make nnsight 0.8.1 do what nnterp's tests expect of nnsight itself (not of unilens): a plain
  ``LanguageModel(repo_id)`` loads its tokenizer under transformers 5.24 (``nnsight_shims``), and a plain model's
  wrapped HF module is readable as ``_model`` (nnsight 0.7's name, which nnterp 1.3's tests use).

Prints pass / fail / skip per test file and model, then each failure's one-line reason. Differences that are nnterp's
bugs or unilens's deliberate choices are listed in docs/coming-from-nnterp.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MIRROR = Path("/work/.mirror/ndif-team+nnterp/repo")
TAG = "v1.3.0"
# hub id the tests see -> unilens.testing model type. The ids follow nnterp's test_config.yaml where it has one.
MODELS: dict[str, str] = {
    "gpt2": "gpt2",
    "yujiepan/llama-2-tiny-random": "llama",
    "yujiepan/qwen2-tiny-random": "qwen2",
    "yujiepan/gemma-2-tiny-random": "gemma2",
    "yujiepan/gptj-tiny-random": "gptj",
    "yujiepan/qwen3-moe-tiny-random": "qwen3_moe",
}
# nnterp's llama_like_models: the ones whose HF tree is model.layers[i].self_attn / .mlp, model.norm
LLAMA_LIKE = ["yujiepan/llama-2-tiny-random", "yujiepan/qwen2-tiny-random", "yujiepan/gemma-2-tiny-random"]
# the hub models these stand for have a chat template (GPT-2 and GPT-J have none): ChatML, so that nnterp's
# it_repeat_prompt test runs instead of skipping
CHAT_MODELS = {"yujiepan/llama-2-tiny-random", "yujiepan/qwen2-tiny-random", "yujiepan/gemma-2-tiny-random",
               "yujiepan/qwen3-moe-tiny-random"}
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORK = Path(os.environ.get("NNTERP_SUITE_DIR", Path(tempfile.gettempdir()) / "unilens_nnterp_suite"))

# before transformers / huggingface_hub are imported: their cache path and offline flag are read at import
os.environ["HF_HUB_CACHE"] = str(WORK / "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def extract_tests() -> Path:
    """nnterp's tests at ``TAG``, extracted from the mirror (never copied into this repository)."""
    dest = WORK / "src"
    tests = dest / "nnterp" / "tests"
    if not (tests / "test_model_renaming.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(MIRROR), "archive", TAG, "nnterp/tests"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return tests


def build_hub() -> None:
    """Save each tiny model under its hub id in a private HF cache (``models--org--name/snapshots/<rev>``)."""
    from unilens.testing import tiny_model

    for name, model_type in MODELS.items():
        repo = WORK / "hub" / ("models--" + name.replace("/", "--"))
        revision = hashlib.sha1(f"{name} chat={name in CHAT_MODELS}".encode()).hexdigest()
        snapshot = repo / "snapshots" / revision
        if (snapshot / "config.json").exists():
            continue
        hf, tok = tiny_model(model_type)
        hf.config.architectures = [type(hf).__name__]
        if name in CHAT_MODELS:
            tok.chat_template = CHATML
        hf.save_pretrained(snapshot)
        tok.save_pretrained(snapshot)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)


def alias_nnterp() -> None:
    """``import nnterp`` -> unilens, with nnterp's submodule paths."""
    import unilens

    sys.modules["nnterp"] = unilens
    for old in unilens.MODULE_ALIASES:
        sys.modules[f"nnterp.{old}"] = sys.modules[f"unilens.{old}"]


@pytest.fixture
def model(model_name):
    """nnterp's ``model`` fixture: ``StandardizedTransformer(model_name)``."""
    from nnterp import StandardizedTransformer

    return StandardizedTransformer(model_name)


@pytest.fixture
def raw_model(model_name):
    """nnterp's ``raw_model`` fixture: nnsight's plain ``LanguageModel(model_name, device_map="auto")``."""
    from nnsight import LanguageModel

    return LanguageModel(model_name, device_map="auto")


def nnsight_shims() -> None:
    """Let nnsight 0.8.1 load a plain ``LanguageModel(repo_id)`` under transformers 5.24 (nnterp's tests build
    their reference models so). nnsight reads which preprocessors a task loads from the pipeline class's
    ``_load_tokenizer`` flags, but transformers 5.24's ``check_task`` names the class by a dotted string, so nnsight
    finds none and passes no tokenizer source ("Impossible to guess which tokenizer to use"). This resolves the
    string; it touches nnsight only (unilens loads the HF model itself and never takes this path)."""
    import importlib

    from nnsight.modeling.transformers import TransformersModel
    from transformers.pipelines import check_task

    flags = {"tokenizer": "_load_tokenizer", "image_processor": "_load_image_processor",
             "feature_extractor": "_load_feature_extractor", "processor": "_load_processor"}

    def loaded_preprocessors(self) -> set:
        impl = check_task(self.task)[1]["impl"]
        if isinstance(impl, str):
            module, _, name = impl.rpartition(".")
            impl = getattr(importlib.import_module(module), name)
        return {attr for attr, flag in flags.items() if getattr(impl, flag, False)}

    TransformersModel._loaded_preprocessors = loaded_preprocessors
    # nnterp 1.3's tests read the wrapped HF model of a plain nnsight model as ``raw_model._model`` (nnsight 0.7's
    # name); nnsight 0.8 calls it ``_module``. (unilens's StandardizedTransformer has ``_model`` itself.)
    if not hasattr(TransformersModel, "_model"):
        TransformersModel._model = property(lambda self: self._module)


class NnterpSuitePlugin:
    """nnterp's fixtures (conftest.py) for the tiny models, and an outcome recorder."""

    def __init__(self) -> None:
        self.outcomes: dict[str, tuple[str, str]] = {}

    # --- nnterp's fixtures --------------------------------------------------------------------------------
    def pytest_generate_tests(self, metafunc):  # noqa: D102
        if "model_name" in metafunc.fixturenames:
            metafunc.parametrize("model_name", list(MODELS))
        if "llama_like_model_name" in metafunc.fixturenames:
            metafunc.parametrize("llama_like_model_name", LLAMA_LIKE)

    # --- recording -----------------------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report):  # noqa: D102
        if report.when == "call" or report.outcome != "passed":
            if report.nodeid in self.outcomes and self.outcomes[report.nodeid][0] != "passed":
                return  # keep the first failure (setup / call) of a test
            reason = ""
            if report.outcome == "failed":
                reason = str(report.longrepr.reprcrash.message if hasattr(report.longrepr, "reprcrash")
                             else report.longrepr).splitlines()[0][:200]
            elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                reason = report.longrepr[2][:200]
            self.outcomes[report.nodeid] = (report.outcome, reason)


def run(pytest_args: list[str], json_out: str | None = None) -> dict[str, tuple[str, str]]:
    """Run nnterp's test files; returns ``{nodeid: (outcome, reason)}`` and prints a table per file."""
    tests = extract_tests()
    build_hub()
    alias_nnterp()
    nnsight_shims()
    plugin = NnterpSuitePlugin()
    args = [str(tests), "--noconftest", "-p", "no:cacheprovider", "-p", "no:anyio", "-q", "--rootdir", str(tests.parent.parent),
            "-W", "ignore::DeprecationWarning:nnsight", *pytest_args]
    cwd = os.getcwd()
    os.chdir(WORK)  # nnterp's tests append notes to ./bump.log: keep them out of the checkout
    try:
        pytest.main(args, plugins=[plugin, sys.modules[__name__]])
    finally:
        os.chdir(cwd)

    table: dict[str, Counter] = defaultdict(Counter)
    for nodeid, (outcome, _) in plugin.outcomes.items():
        table[nodeid.split("::")[0].rsplit("/", 1)[-1]][outcome] += 1
    print(f"\n{'file':28} {'passed':>7} {'failed':>7} {'skipped':>8}")
    for name in sorted(table):
        c = table[name]
        print(f"{name:28} {c['passed']:>7} {c['failed']:>7} {c['skipped']:>8}")
    total = sum(table.values(), Counter())
    print(f"{'total':28} {total['passed']:>7} {total['failed']:>7} {total['skipped']:>8}")
    failures = [(n, r) for n, (o, r) in plugin.outcomes.items() if o == "failed"]
    for nodeid, reason in failures:
        path, _, test = nodeid.partition("::")
        print(f"FAILED {path.rsplit('/', 1)[-1]}::{test}: {reason}")
    if json_out:
        Path(json_out).write_text(json.dumps(plugin.outcomes, indent=1))
    return plugin.outcomes


if __name__ == "__main__":
    argv = sys.argv[1:]
    out = None
    if "--json" in argv:
        i = argv.index("--json")
        out = argv[i + 1]
        del argv[i:i + 2]
    outcomes = run(argv, out)
    sys.exit(1 if any(o == "failed" for o, _ in outcomes.values()) else 0)
