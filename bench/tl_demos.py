"""TransformerLens's own demo notebooks, cell by cell, on unilens and on TransformerLens 4.3's TransformerBridge.

Every code cell of each chosen notebook in ``demos/`` of the TransformerLens repository runs in order, in one
namespace (an in-process IPython shell, so ``get_ipython()`` / ``display()`` work), with a per-cell time limit.
The only change to a notebook is its model-loading statement(s): an assignment whose value is a call of
``TransformerBridge.boot_transformers(...)`` or ``HookedTransformer.from_pretrained(...)`` becomes
``<same name> = __tl_demos_load__(<its first argument>)``, which loads SmolLM2-135M-Instruct (the same safetensors
folder on both sides): on the bridge side with ``TransformerBridge.boot_transformers(folder)``, on the unilens
side with ``unilens.HookedTransformer.from_pretrained(folder)``. Everything else, including the notebook's
``model.enable_compatibility_mode(...)`` / ``set_use_attn_result(...)`` calls, is the notebook's own code.

Each side runs in its own subprocess per notebook:
- bridge: ``bench/.venv-anchors/bin/python`` (transformer-lens 4.3, nnsight 0.7, jupyter);
- unilens: ``/work/main/.venv/bin/python`` (unilens's lock: nnsight 0.8.1), with the anchors venv's
  site-packages *appended* to ``sys.path`` so the notebooks' own imports (transformer_lens's utilities,
  circuitsvis, plotly, einops, fancy_einsum, jaxtyping, IPython) resolve, while torch / transformers / nnsight
  come from unilens's environment.

Rules applied to both sides alike:
- IPython magics (``%pip``, ``%autoreload``, ``!cmd``) become ``pass`` (same indentation); autoreload, when a
  notebook loads it through ``get_ipython()``, is switched off after the cell (the code under test must not be
  reloaded mid-run).
- ``GITHUB_ACTIONS=true``: the notebooks' own CI switch (``IN_GITHUB``); it skips their hour-long loops (e.g.
  Exploratory Analysis's direct-path sweeps over every later layer) exactly as TransformerLens's CI does.
- Cells marked ``# NBVAL_SKIP`` (TransformerLens's marker for "too slow for CI without a GPU") are not run and
  are counted as skipped on both sides; ``--include-skipped`` runs them too.
- Plotly figures are built but not shown (``BaseFigure.show`` serialises the figure and returns);
  ``HF_HUB_OFFLINE=1``; CPU, float32.
- ``CAPS``: a few literal edits that shrink a cell's loop where it would take many minutes on 2 shared CPU
  cores, listed with the reason; applied to both sides and reported in the results.

Usage (the notebooks are read from the TransformerLens git mirror, never copied into this repository; any
clone works: ``git clone https://github.com/TransformerLensOrg/TransformerLens`` and pass its ``.git``)::

    .venv/bin/python bench/tl_demos.py                          # every chosen notebook, both sides
    .venv/bin/python bench/tl_demos.py --side unilens           # rerun unilens only (keeps the bridge's results)
    .venv/bin/python bench/tl_demos.py --notebooks Main_Demo --timeout 300
    .venv/bin/python bench/tl_demos.py --demos-dir /tmp/tl_demos   # a folder of .ipynb files instead of git

Writes bench/tl_demos.json (every cell's outcome), the ``<!-- tl-demos -->`` section of bench/RESULTS.md, and
a human-readable list of unilens's failing cells (``--notes``, default /work/notes/tl_demo_failures.md).
"""

from __future__ import annotations

import argparse
import ast
import datetime as _dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TL_REPO = "/work/.mirror/TransformerLensOrg+TransformerLens/repo"
DEFAULT_REV = "main"  # the mirror's main is the 4.x line (transformer-lens 4.3 on PyPI); see --rev
ANCHORS_PYTHON = ROOT / "bench/.venv-anchors/bin/python"
UNILENS_PYTHON = ROOT / ".venv/bin/python"
RESULTS_MD = ROOT / "bench/RESULTS.md"
RESULTS_JSON = {"smollm2": ROOT / "bench/tl_demos.json", "mini": ROOT / "bench/tl_demos.mini.json"}
DEFAULT_NOTES = Path("/work/notes/tl_demo_failures.md")
MARK_BEGIN, MARK_END = "<!-- tl-demos -->", "<!-- /tl-demos -->"

# The notebooks that need only a model, its cache and hooks (with the reason a model may differ).
NOTEBOOKS: dict[str, str] = {
    "Main_Demo": "the second model (distilgpt2) is a second load of the same model",
    "Exploratory_Analysis_Demo": "",
    "Activation_Patching_in_TL_Demo": "attn-only-2l (an induction checkpoint) is the same model as the rest: its cells "
                                      "only need a model with a 10k+ vocabulary; the induction scores are not checked",
    "Attribution_Patching_Demo": "",
    "Direct_Logit_Attribution_Demo": "",
    "Head_Detector_Demo": "",
    "Patchscopes_Generation_Demo": "",
    "direct_path_patching_ioi": "loads the legacy HookedTransformer (gpt2, folded); both sides load the same model",
    "LLaMA": "Llama-3.2-1B is SmolLM2 (also a Llama), or its mini copy",
}  # fmt: skip

# Notebooks left out, and why.
EXCLUDED: dict[str, str] = {
    "ARENA_Content": "re-implements GPT-2 from scratch and loads GPT-2's weights into it (LayerNorm, learned "
                     "positions)",
    "BERT": "encoder-only model (unilens: causal LMs)",
    "T5": "encoder-decoder model (unilens: causal LMs)",
    "Bridge_Evals_Demo": "needs lm-eval and Hub datasets",
    "Colab_Compatibility": "downloads and checks hundreds of Hub checkpoints",
    "Config_Overhaul": "about TransformerLens's config internals; loads no model",
    "GPT_OSS_Demo": "GPT-OSS checkpoint specific (MoE, builds a legacy HookedTransformer from its config)",
    "Gemma3_Multimodal": "multimodal checkpoint (image inputs)",
    "LLaVA": "multimodal checkpoint (image inputs)",
    "LLaMA_GPU_Quantized": "needs a GPU (4-bit quantized weights)",
    "Qwen": "compares a Qwen checkpoint against its HF original; checkpoint specific",
    "Santa_Coder": "compares a Bloom checkpoint block by block against HF; checkpoint specific",
    "stable_lm": "two 3B StableLM checkpoints (base vs tuned chat behaviour)",
    "Interactive_Neuroscope": "a gradio web app",
    "LIT_Integration_Demo": "Google's LIT server integration (transformer_lens.lit)",
    "Othello_GPT": "the Othello-GPT checkpoint and its probe / board data",
    "SVD_Interpreter_Demo": "pysvelte (not installable) and the legacy HookedTransformer's SVDInterpreter "
                            "(gpt2-medium)",
    "Tracr_to_Transformer_Lens_Demo": "tracr (JAX) compiled programs, a model built from a config",
    "Realtime_Training_Telemetry_Demo": "trains a model built from a TransformerBridgeConfig; no pretrained model",
    "Grokking_Demo": "trains a modular-addition model (its notebook blob is absent from the mirror)",
    "No_Position_Experiment": "trains a model without positions (its notebook blob is absent from the mirror)",
}  # fmt: skip

# (notebook, code-cell index, literal old, literal new, why): applied to both sides, reported in the results.
# Each shrinks a loop of hundreds of forwards that would take many minutes on 2 shared CPU cores; every 6th layer
# of SmolLM2's 30 (0, 6, 12, 18, 24) keeps early, middle and late layers in the loop.
_EVERY_6TH = "every 6th layer (5 of 30): the loop runs one forward per layer x position / head"
CAPS: list[tuple[str, int, str, str, str]] = [
    *[("Exploratory_Analysis_Demo", cell, "for layer in range(model.cfg.n_layers):",
       "for layer in range(model.cfg.n_layers)[::6]:", _EVERY_6TH) for cell in (20, 22, 25, 27, 30)],
    ("Main_Demo", 16, "for layer in tqdm.tqdm(range(model.cfg.n_layers)):",
     "for layer in tqdm.tqdm(range(model.cfg.n_layers)[::6]):", _EVERY_6TH),
    ("Patchscopes_Generation_Demo", 17, "for target_layer_id in range(12):", "for target_layer_id in range(12)[::4]:",
     "12 target layers x 20 generated tokens, one forward each: every 4th target layer"),
    ("Patchscopes_Generation_Demo", 19, "for source_layer_id in range(12):", "for source_layer_id in range(12)[::4]:",
     "12 x 12 layer pairs x 20 generated tokens = 2880 forwards: every 4th source and target layer (180)"),
    ("Patchscopes_Generation_Demo", 19, "    for target_layer_id in range(12):",
     "    for target_layer_id in range(12)[::4]:", "(same cell, inner loop)"),
]  # fmt: skip

# (notebook, code-cell index, why): cells that call one of TransformerLens's patching sweeps (hundreds of forwards
# inside a library function, so no loop of the notebook's to shrink); not run by default on either side, like
# NBVAL_SKIP cells; --include-slow runs them.
SLOW: list[tuple[str, int, str]] = [
    ("Activation_Patching_in_TL_Demo", 12, "patching.get_act_patch_resid_pre: 30 layers x 15 positions = 450 "
                                           "forwards of 8"),
    ("Activation_Patching_in_TL_Demo", 13, "patching.get_act_patch_attn_head_out_all_pos: 270 forwards of 8"),
]  # fmt: skip

LOAD_FN = "__tl_demos_load__"
_LOADERS = {("TransformerBridge", "boot_transformers"), ("HookedTransformer", "from_pretrained"),
            ("HookedTransformer", "from_pretrained_no_processing")}  # fmt: skip
_MAGIC = re.compile(r"^(\s*)(%%?|!)\S")


# ----------------------------------------------------------------------------------------------------------
# Cell preparation (pure functions; tests/test_bench_tl_demos.py runs them on a synthetic notebook)
# ----------------------------------------------------------------------------------------------------------


def code_cells(notebook: dict) -> list[str]:
    """The source of every code cell of a notebook (``.ipynb`` JSON), in order.

    Example:
        >>> code_cells({"cells": [{"cell_type": "markdown", "source": ["# hi"]},
        ...                       {"cell_type": "code", "source": ["x = 1\\n", "y = 2"]}]})
        ['x = 1\\ny = 2']
    """
    cells = []
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code":
            source = cell.get("source", "")
            cells.append("".join(source) if isinstance(source, list) else str(source))
    return cells


def strip_magics(source: str) -> str:
    """Replace IPython magic / shell lines (``%pip ...``, ``%%capture``, ``!ls``) by ``pass`` at the same indentation.

    Example:
        >>> strip_magics("if x:\\n    %pip install y\\nz = 1")
        'if x:\\n    pass\\nz = 1'
    """
    lines = []
    for line in source.split("\n"):
        match = _MAGIC.match(line)
        lines.append(f"{match.group(1)}pass" if match else line)
    return "\n".join(lines)


def _loader_call(node: ast.AST) -> ast.Call | None:
    """The ``Class.method(...)`` call of a model-loading assignment's value, or None."""
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
        return None
    owner = node.func.value
    owner_name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", None)
    return node if (owner_name, node.func.attr) in _LOADERS else None


def replace_loading(source: str) -> tuple[str, list[str]]:
    """Replace each model-loading assignment by ``<target> = __tl_demos_load__(<first argument>)``.

    A model-loading assignment is a statement ``name = TransformerBridge.boot_transformers(...)`` or
    ``name = HookedTransformer.from_pretrained[_no_processing](...)``, at any depth (inside ``if``/``try``);
    the statement's lines are replaced, keeping its indentation. The first argument (the model name, a literal
    or a variable) is passed on so the loader can pick a model per name. Returns the new source and the
    original statements that were replaced. A cell that does not parse is returned unchanged.

    Example:
        >>> new, old = replace_loading('m = TransformerBridge.boot_transformers(\\n    "gpt2", device="cpu")\\nm.eval()')
        >>> print(new)
        m = __tl_demos_load__('gpt2')
        m.eval()
        >>> old
        ['m = TransformerBridge.boot_transformers(\\n    "gpt2", device="cpu")']
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source, []
    lines = source.split("\n")
    edits = []  # (first line, last line, replacement), 0-based inclusive
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        call = _loader_call(node.value)
        if call is None:
            continue
        first = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "model_name"), None)
        argument = ast.unparse(first) if first is not None else ""
        indent = re.match(r"\s*", lines[node.lineno - 1]).group(0)
        edits.append((node.lineno - 1, node.end_lineno - 1,
                      f"{indent}{ast.unparse(node.targets[0])} = {LOAD_FN}({argument})"))  # fmt: skip
    replaced = []
    for start, end, text in sorted(edits, reverse=True):
        replaced.append("\n".join(lines[start : end + 1]).strip())
        lines[start : end + 1] = [text]
    return "\n".join(lines), replaced[::-1]


def first_code_line(source: str) -> str:
    """The first line of a cell that is neither blank nor a comment (what a reader recognises the cell by).

    Example:
        >>> first_code_line("# NBVAL_IGNORE_OUTPUT\\n\\nmodel = load()\\n")
        'model = load()'
    """
    for line in source.split("\n"):
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    return source.strip().split("\n")[0] if source.strip() else ""


def prepare_cells(notebook: dict, name: str, include_skipped: bool = False, include_slow: bool = False
                  ) -> list[dict[str, Any]]:
    """Every code cell of a notebook ready to run: magics stripped, loading replaced, caps applied, skips marked.

    Example:
        >>> nb = {"cells": [{"cell_type": "code", "source": "%pip install x\\nimport torch"},
        ...                 {"cell_type": "code", "source": "# NBVAL_SKIP\\nslow()"}]}
        >>> [(c["index"], c["source"], c["skip"]) for c in prepare_cells(nb, "demo")]
        [(0, 'pass\\nimport torch', None), (1, '# NBVAL_SKIP\\nslow()', 'NBVAL_SKIP')]
    """
    cells = []
    for index, original in enumerate(code_cells(notebook)):
        source, replaced = replace_loading(strip_magics(original))
        caps = []
        for notebook_name, cell_index, old, new, why in CAPS:
            if notebook_name == name and cell_index == index:
                if old not in source:
                    raise ValueError(f"CAPS: {name} cell {index} no longer contains {old!r}; update CAPS in {__file__}")
                source = source.replace(old, new)
                caps.append(f"{old} -> {new} ({why})")
        skip = "NBVAL_SKIP" if "NBVAL_SKIP" in original and not include_skipped else None
        slow = [why for notebook_name, cell_index, why in SLOW if (notebook_name, cell_index) == (name, index)]
        if skip is None and slow and not include_slow:
            skip = f"slow: {slow[0]}"
        cells.append({"index": index, "source": source, "first_line": first_code_line(original),
                      "replaced": replaced, "caps": caps, "skip": skip})  # fmt: skip
    return cells


MINI = {"hidden_size": 72, "head_dim": 8, "intermediate_size": 192}


def mini_model_folder(smollm2_folder: str, out: str) -> str:
    """SmolLM2's config and tokenizer with a 72-wide residual stream (head_dim 8), random weights (seed 0).

    Everything a notebook indexes is SmolLM2's (30 layers, 9 query / 3 key-value heads, vocabulary 49152,
    tokenizer, tied embeddings, RMSNorm, rotary), but a forward costs ~50x less: the harness's fast mode for a
    busy machine, where SmolLM2's forwards would take hours of notebook cells. Written once to ``out``.
    """
    if (Path(out) / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2_folder)
    for key, value in MINI.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_folder).save_pretrained(out)
    return out


def read_notebook(name: str, tl_repo: str | None, rev: str, demos_dir: str | None) -> dict:
    """A demo notebook's JSON: from ``demos_dir/<name>.ipynb`` if given, else ``git show <rev>:demos/<name>.ipynb``."""
    if demos_dir:
        return json.loads((Path(demos_dir) / f"{name}.ipynb").read_text())
    text = subprocess.run(["git", "-C", str(tl_repo), "show", f"{rev}:demos/{name}.ipynb"], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(text)


# ----------------------------------------------------------------------------------------------------------
# Worker: runs in the side's own interpreter (``--worker``)
# ----------------------------------------------------------------------------------------------------------


class CellTimeout(Exception):
    """A cell ran past its time limit."""


def _worker_setup(side: str, anchors_site: str | None) -> None:
    if side != "unilens":
        return
    if anchors_site:
        import site

        site.addsitedir(anchors_site)  # appended: unilens's own torch / transformers / nnsight stay first
    # a snapshot of the unilens package, first on sys.path (before the editable install's finder): nnsight reads
    # the source lines of a trace's ``with`` statement at run time, so an edit of unilens's files during a run
    # (other people work in this checkout) would break traces mid-notebook
    import shutil

    snapshot = Path(tempfile.mkdtemp(prefix="tl_demos_unilens_src_"))
    shutil.copytree(ROOT / "unilens", snapshot / "unilens", ignore=shutil.ignore_patterns("__pycache__"))
    sys.path.insert(0, str(snapshot))


def _smollm2_folder() -> str:
    folder = os.environ.get("TL_DEMOS_MODEL")
    if folder:
        return folder
    raise RuntimeError("TL_DEMOS_MODEL is not set: the driver passes the SmolLM2 safetensors folder to the worker")


def _make_loader(side: str):
    import torch

    folder = _smollm2_folder()
    if side == "bridge":
        from transformer_lens.model_bridge import TransformerBridge

        def load(name: Any = None, *args: Any, **kwargs: Any):
            return TransformerBridge.boot_transformers(folder, device="cpu", dtype=torch.float32)
    else:
        import unilens

        def load(name: Any = None, *args: Any, **kwargs: Any):
            return unilens.HookedTransformer.from_pretrained(folder)

    return load


def _quiet_plots() -> None:
    try:
        import plotly.basedatatypes as plotly_base
        import plotly.io as pio
    except ImportError:
        return

    def show(self, *args: Any, **kwargs: Any) -> None:
        self.to_plotly_json()  # the figure is built and serialisable; nothing is opened

    plotly_base.BaseFigure.show = show
    pio.show = lambda fig, *args, **kwargs: show(fig)


def _error_record(err: BaseException, cell_filename_prefix: str = "<ipython-input-") -> dict[str, Any]:
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    in_cell = [f for f in frames if f.filename.startswith(cell_filename_prefix)]
    deepest = frames[-1] if frames else None
    message = str(err).strip().split("\n")[0][:400]
    return {"type": type(err).__name__, "message": message,
            "cell_line": in_cell[-1].line if in_cell else None,
            "cell_lineno": in_cell[-1].lineno if in_cell else None,
            "raised_at": f"{deepest.filename}:{deepest.lineno} ({deepest.name})" if deepest else None}  # fmt: skip


def worker(side: str, cells_path: str, result_path: str, timeout: float, threads: int,
           anchors_site: str | None) -> None:
    """Run prepared cells in one IPython namespace; write the results after every cell."""
    import signal

    _worker_setup(side, anchors_site)
    import torch

    torch.set_num_threads(threads)
    from IPython.core.interactiveshell import InteractiveShell

    _quiet_plots()
    shell = InteractiveShell.instance()
    try:
        shell.colors = "nocolor"  # plain tracebacks in the logs
    except Exception:  # noqa: BLE001 - older IPython spells it NoColor
        shell.colors = "NoColor"
    shell.user_ns[LOAD_FN] = _make_loader(side)
    meta: dict[str, Any] = {"side": side, "python": sys.executable, "torch": torch.__version__}
    try:
        import importlib.metadata as md

        meta["transformer_lens"] = md.version("transformer-lens")
        meta["nnsight"] = md.version("nnsight")
        meta["transformers"] = md.version("transformers")
    except Exception:  # noqa: BLE001 - metadata is informative only
        pass
    cells = json.loads(Path(cells_path).read_text())
    results: list[dict[str, Any]] = []

    fired: list[bool] = []  # whether this cell's alarm went off

    def on_alarm(signum, frame):
        fired.append(True)
        raise CellTimeout(f"cell ran past {timeout:.0f} s")

    signal.signal(signal.SIGALRM, on_alarm)
    for cell in cells:
        record: dict[str, Any] = {"index": cell["index"], "first_line": cell["first_line"]}
        if cell["skip"]:
            record["status"] = "skipped"
            record["reason"] = cell["skip"]
        else:
            start = time.perf_counter()
            fired.clear()
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                outcome = shell.run_cell(cell["source"], store_history=True)
                error = outcome.error_before_exec or outcome.error_in_exec
            except CellTimeout as err:  # raised outside IPython's own exception handling
                error = err
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            record["seconds"] = round(time.perf_counter() - start, 2)
            if error is not None and fired and not isinstance(error, CellTimeout):
                # the alarm fired inside library code that turned CellTimeout into another exception on its way out
                # (nnsight's traceback filter raised a TypeError): the cell ran out of time
                error = CellTimeout(f"cell ran past {timeout:.0f} s (surfaced as {type(error).__name__}: {error})")
            if error is None:
                record["status"] = "ok"
            else:
                record["status"] = "timeout" if isinstance(error, CellTimeout) else "error"
                record["error"] = _error_record(error)
            if "autoreload" in shell.extension_manager.loaded:
                shell.run_line_magic("autoreload", "0")  # never reload the code under test mid-run
        results.append(record)
        sys.stdout.flush()
        Path(result_path).write_text(json.dumps({"meta": meta, "cells": results}, indent=1))


# ----------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------


def _anchors_site() -> str | None:
    found = sorted((ROOT / "bench/.venv-anchors/lib").glob("python*/site-packages"))
    return str(found[0]) if found else None


def run_side(name: str, side: str, cells: list[dict], args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    """Run one notebook's prepared cells on one side in a subprocess; returns {"meta", "cells", "rc", "seconds"}."""
    python = args.bridge_python if side == "bridge" else args.unilens_python
    work = Path(tempfile.mkdtemp(prefix=f"tl_demos_{side}_"))
    cells_path, result_path = work / "cells.json", work / "result.json"
    cells_path.write_text(json.dumps(cells))
    env = dict(os.environ, GITHUB_ACTIONS="true", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg",
               TL_DEMOS_MODEL=args.model, CUDA_VISIBLE_DEVICES="")  # fmt: skip
    command = [str(python), str(Path(__file__).resolve()), "--worker", "--side", side, "--cells", str(cells_path),
               "--result", str(result_path), "--timeout", str(args.timeout), "--threads", str(args.threads)]
    if side == "unilens" and _anchors_site():
        command += ["--anchors-site", _anchors_site()]
    runnable = sum(1 for c in cells if not c["skip"])
    log = log_dir / f"{name}.{side}.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(command, cwd=str(work), env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=args.timeout * runnable + 300).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = "timeout"
    result = json.loads(result_path.read_text()) if result_path.exists() else {"meta": {}, "cells": []}
    done = {c["index"] for c in result["cells"]}
    for cell in cells:  # cells the worker never reached (it crashed or was killed)
        if cell["index"] not in done:
            result["cells"].append({"index": cell["index"], "first_line": cell["first_line"], "status": "not run",
                                    "error": {"type": "WorkerDied", "message": f"worker exit {rc}; see {log}"}})
    result["cells"].sort(key=lambda c: c["index"])
    result.update(rc=rc, seconds=round(time.perf_counter() - start, 1), log=str(log))
    return result


def _count(side_result: dict | None) -> int | None:
    if not side_result:
        return None
    return sum(1 for c in side_result["cells"] if c["status"] == "ok")


def _likely_cascade(error: dict) -> bool:
    return error.get("type") == "NameError"


MODEL_TEXT = {"smollm2": "SmolLM2-135M-Instruct",
              "mini": "SmolLM2-mini (SmolLM2's config, tokenizer and 30 x 9 heads, 72 wide, random weights: fast mode)"}


def render_table(data: dict, json_name: str = "bench/tl_demos.json") -> str:
    """One model's table (a part of the ``<!-- tl-demos -->`` section of bench/RESULTS.md)."""
    meta = data.get("meta", {})
    model = MODEL_TEXT.get(meta.get("model_kind", ""), meta.get("model", "?"))
    lines = [f"### {model}", "",
             f"Written by `bench/tl_demos.py --model {meta.get('model_kind', '?')}` on {meta.get('date', '?')} "
             f"(TransformerLens demos from `{meta.get('source', '?')}`). Every code cell of each notebook in order, one "
             f"namespace, only the model-loading statement changed: {model} on both sides "
             "(`TransformerBridge.boot_transformers(folder)` / `unilens.HookedTransformer.from_pretrained(folder)`), "
             f"CPU float32, {meta.get('timeout', '?')} s per cell. Cells marked `# NBVAL_SKIP` (TransformerLens's own "
             "\"too slow for CI\" marker) are not run on either side; `GITHUB_ACTIONS=true` as in TransformerLens's CI. "
             f"See the script's docstring for the rules, and {json_name} for every cell's outcome.", "",
             f"Bridge: transformer-lens {meta.get('bridge', {}).get('transformer_lens', '?')} "
             f"(nnsight {meta.get('bridge', {}).get('nnsight', '?')}); unilens side: nnsight "
             f"{meta.get('unilens', {}).get('nnsight', '?')}, transformers {meta.get('unilens', {}).get('transformers', '?')}.",
             "", "| notebook | code cells | skipped (NBVAL_SKIP, slow) | ran on bridge | ran on unilens | unilens >= bridge |",
             "|---|---:|---:|---:|---:|---|"]  # fmt: skip
    totals = [0, 0, 0, 0]
    for name, entry in data["notebooks"].items():
        bridge, ours = _count(entry.get("bridge")), _count(entry.get("unilens"))
        met = "-" if bridge is None or ours is None else ("yes" if ours >= bridge else "**no**")
        lines.append(f"| {name} | {entry['total']} | {entry['skipped']} | {'-' if bridge is None else bridge} | "
                     f"{'-' if ours is None else ours} | {met} |")  # fmt: skip
        totals = [totals[0] + entry["total"], totals[1] + entry["skipped"], totals[2] + (bridge or 0),
                  totals[3] + (ours or 0)]  # fmt: skip
    lines.append(f"| **all** | {totals[0]} | {totals[1]} | {totals[2]} | {totals[3]} | "
                 f"{'yes' if totals[3] >= totals[2] else '**no**'} |")  # fmt: skip
    lines += ["", "Failing cells (code-cell index: exception type; `*` = a NameError, usually a consequence of an "
              "earlier failure):", ""]  # fmt: skip
    for name, entry in data["notebooks"].items():
        for side in ("bridge", "unilens"):
            result = entry.get(side)
            if not result:
                continue
            failed = [f"{c['index']}: {c['error']['type']}{'*' if _likely_cascade(c['error']) else ''}"
                      for c in result["cells"] if c["status"] not in ("ok", "skipped")]  # fmt: skip
            lines.append(f"- {name}, {side}: {', '.join(failed) if failed else 'none'}")
    return "\n".join(lines)


def render_section(datasets: list[tuple[dict, str]], notebooks: list[str]) -> str:
    """The ``<!-- tl-demos -->`` section of bench/RESULTS.md: a table per model run, then what was changed."""
    lines = [MARK_BEGIN, "## TransformerLens demo notebooks: unilens vs TransformerLens 4.3's TransformerBridge", ""]
    for data, json_name in datasets:
        lines += [render_table(data, json_name), ""]
    lines += _render_changes(notebooks)
    return "\n".join(lines)


def _render_changes(notebooks: list[str]) -> list[str]:
    lines = []
    notes = [f"- {name}: {why}" for name, why in NOTEBOOKS.items() if why and name in notebooks]
    lines += ["The demos at the mirror's `main` import names TransformerLens 4.3's wheel no longer ships "
              "(`HookedTransformer`, `transformer_lens.utils`, `transformer_lens.loading_from_pretrained`) and one uses a "
              "Python 3.12 f-string; those cells (and what depends on them) fail on both sides alike.", ""]
    caps = [f"- {name} cell {index}: `{old}` -> `{new}` ({why})" for name, index, old, new, why in CAPS
            if name in notebooks]  # fmt: skip
    if notes:
        lines += ["", "Models other than the notebook's:", "", *notes]
    slow = [f"- {name} cell {index}: {why}" for name, index, why in SLOW if name in notebooks]
    if slow:
        lines += ["", "Cells not run on either side by default (`--include-slow` runs them):", "", *slow]
    if caps:
        lines += ["", "Loops shrunk on both sides (a cell that would run for many minutes on 2 shared cores):", "",
                  *caps]
    lines += ["", "Notebooks not run (they need more than a pretrained causal LM, its cache and hooks):", "",
              *[f"- {name}: {why}" for name, why in EXCLUDED.items()], "", MARK_END]  # fmt: skip
    return lines


def write_results_md(section: str, path: Path = RESULTS_MD) -> None:
    """Replace the delimited section of RESULTS.md (append it if absent); the rest of the file is kept."""
    text = path.read_text() if path.exists() else ""
    if MARK_BEGIN in text and MARK_END in text:
        before, rest = text.split(MARK_BEGIN, 1)
        after = rest.split(MARK_END, 1)[1]
        text = before + section + after
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def render_notes(data: dict) -> str:
    """Human-readable unilens failures (for the people fixing unilens), with the bridge's outcome beside each."""
    lines = ["# TransformerLens demo notebooks: unilens failures", "",
             f"Generated by `bench/tl_demos.py` on {data['meta'].get('date', '?')}; rerun with "
             "`.venv/bin/python bench/tl_demos.py --side unilens` (bridge results are kept from the last full run).",
             "Cells are code-cell indices (markdown cells not counted). `bridge:` says what the bridge did on the "
             "same cell.",
             "NameError failures are usually a consequence of an earlier failing cell.", ""]  # fmt: skip
    for name, entry in data["notebooks"].items():
        ours, bridge = entry.get("unilens"), entry.get("bridge")
        if not ours:
            continue
        bridge_by_index = {c["index"]: c for c in (bridge or {}).get("cells", [])}
        lines.append(f"## {name}: unilens {_count(ours)} / bridge {_count(bridge)} of {entry['total']} "
                     f"({entry['skipped']} skipped)")  # fmt: skip
        lines.append("")
        for cell in ours["cells"]:
            if cell["status"] in ("ok", "skipped"):
                continue
            error = cell.get("error", {})
            other = bridge_by_index.get(cell["index"], {})
            other_text = other.get("status", "?")
            if other.get("error"):
                other_text += f" ({other['error']['type']}: {other['error']['message'][:120]})"
            lines.append(f"- cell {cell['index']} `{cell['first_line'][:100]}`")
            if error.get("cell_line"):
                lines.append(f"  - line {error.get('cell_lineno')}: `{error['cell_line'][:160]}`")
            lines.append(f"  - **{error.get('type')}**: {error.get('message', '')[:300]}")
            if error.get("raised_at"):
                lines.append(f"  - raised at {error['raised_at']}")
            lines.append(f"  - bridge: {other_text}")
        lines.append("")
    return "\n".join(lines)


def _section_for(json_path: Path, data: dict) -> str:
    """The section from every model's JSON that exists (SmolLM2 first), this run's data for its own file."""
    datasets = []
    for path in dict.fromkeys([*RESULTS_JSON.values(), json_path]):
        loaded = data if path == json_path else (json.loads(path.read_text()) if path.exists() else None)
        if loaded:
            name = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
            datasets.append((loaded, name))
    notebooks = list(dict.fromkeys(n for d, _ in datasets for n in d["notebooks"]))
    return render_section(datasets, notebooks)


HAND_WRITTEN = "<!-- hand-written: kept when the file is regenerated -->"


def write_notes(text: str, path: Path) -> None:
    """Write the generated notes, keeping whatever follows the hand-written marker in the existing file."""
    kept = ""
    if path.exists() and HAND_WRITTEN in path.read_text():
        kept = path.read_text().split(HAND_WRITTEN, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n\n" + HAND_WRITTEN + (kept or "\n"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tl-repo", default=DEFAULT_TL_REPO,
                        help="TransformerLens git dir (a mirror or a clone's .git)")
    parser.add_argument("--rev", default=DEFAULT_REV, help="revision of the TransformerLens repo to read demos/ from")
    parser.add_argument("--demos-dir", default=None, help="read <name>.ipynb from this folder instead of git")
    parser.add_argument("--notebooks", default=",".join(NOTEBOOKS), help="comma-separated notebook names")
    parser.add_argument("--side", choices=("both", "bridge", "unilens"), default="both")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per cell")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each worker")
    parser.add_argument("--include-skipped", action="store_true", help="also run cells marked # NBVAL_SKIP")
    parser.add_argument("--include-slow", action="store_true", help="also run the cells listed in SLOW")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite RESULTS.md's section and the notes from the JSON, run nothing")
    parser.add_argument("--model", default="smollm2",
                        help="'smollm2' (unilens's converted SmolLM2 safetensors folder), 'mini' (SmolLM2's shape and "
                             "tokenizer, 72 wide, random weights: fast mode), or a folder")
    parser.add_argument("--json", default=None, help="default: bench/tl_demos.json (SmolLM2), bench/tl_demos.mini.json")
    parser.add_argument("--results-md", default=str(RESULTS_MD))
    parser.add_argument("--notes", default=str(DEFAULT_NOTES))
    parser.add_argument("--log-dir", default="/tmp/tl_demos_logs")
    parser.add_argument("--bridge-python", default=str(ANCHORS_PYTHON))
    parser.add_argument("--unilens-python", default=str(UNILENS_PYTHON))
    # worker mode
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cells", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--anchors-site", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.side, args.cells, args.result, args.timeout, args.threads, args.anchors_site)
        return 0

    model_kind = args.model if args.model in ("smollm2", "mini") else "folder"
    if args.model in ("smollm2", "mini"):
        out = subprocess.run([str(args.unilens_python), "-c", "import unilens; from unilens.arch.loading import "
                              "gguf_cache_dir; print(gguf_cache_dir(unilens.default_model_path()))"],
                             cwd=str(ROOT), capture_output=True, text=True, check=True)  # fmt: skip
        smollm2 = out.stdout.strip().splitlines()[-1]
        mini = Path(args.log_dir) / "mini"
        args.model = smollm2 if args.model == "smollm2" else mini_model_folder(smollm2, str(mini))
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else RESULTS_JSON.get(model_kind, RESULTS_JSON["smollm2"])
    data = json.loads(json_path.read_text()) if json_path.exists() else {"meta": {}, "notebooks": {}}
    data["meta"].update(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), timeout=args.timeout,
                        source=args.demos_dir or f"{args.tl_repo} @ {args.rev}", model=args.model,
                        model_kind=model_kind)  # fmt: skip
    if args.render_only:
        if not json_path.exists():
            raise SystemExit(f"--render-only: {json_path} does not exist; run the notebooks first")
        data = json.loads(json_path.read_text())
        write_results_md(_section_for(json_path, data), Path(args.results_md))
        if args.notes:
            write_notes(render_notes(data), Path(args.notes))
        return 0
    sides = ("bridge", "unilens") if args.side == "both" else (args.side,)
    for name in [n.strip() for n in args.notebooks.split(",") if n.strip()]:
        cells = prepare_cells(read_notebook(name, args.tl_repo, args.rev, args.demos_dir), name, args.include_skipped,
                              args.include_slow)
        entry = data["notebooks"].setdefault(name, {})
        entry.update(total=len(cells), skipped=sum(1 for c in cells if c["skip"]),
                     replaced={c["index"]: c["replaced"] for c in cells if c["replaced"]})  # fmt: skip
        for side in sides:
            result = run_side(name, side, cells, args, log_dir)
            entry[side] = result
            data["meta"][side] = result.get("meta", {})
            print(f"{name:34s} {side:8s} {_count(result):3d}/{len(cells)} ok  ({result['seconds']:.0f} s, "
                  f"rc {result['rc']})", flush=True)
            # another harness process may have written other notebooks meanwhile: merge into the file's latest state
            latest = json.loads(json_path.read_text()) if json_path.exists() else {"meta": {}, "notebooks": {}}
            latest["meta"].update({k: v for k, v in data["meta"].items() if k not in ("bridge", "unilens")})
            latest["meta"][side] = data["meta"][side]
            latest["notebooks"][name] = entry
            data = latest
            json_path.write_text(json.dumps(data, indent=1))
            write_results_md(_section_for(json_path, data), Path(args.results_md))
            if args.notes:
                write_notes(render_notes(data), Path(args.notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
