"""The command line's errors: every user mistake is one ``error: ...`` line on stderr and exit status 2, with no
traceback; Ctrl-C is ``interrupted`` and 130; arguments are checked before the model loads (what needs the model:
right after it loads, before any forward); every verb takes the same model sources; a bug keeps its traceback.

Each case runs `unilens.ui.cli.main` in this process (what ``python -m unilens`` runs: `unilens.__main__`), with a
tiny zoo model type as ``--model``; a few run as real subprocesses for what only a process shows (the exit status
through ``python -m unilens``, Ctrl-C, nothing loaded before an argument error). docs/errors.md lists each case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from unilens.scale import cli_cache
from unilens.scale.store import CacheError
from unilens.ui import cli

REPO = Path(__file__).resolve().parents[1]
CLEAN, CORRUPTED = "The capital of France is", "The capital of Italy is"


def _unwritable_dir() -> Path | None:
    """A folder this process cannot create files in: a chmod 555 one, or (as root, who ignores permissions) a
    read-only system folder."""
    if os.geteuid() != 0:
        folder = Path(tempfile.mkdtemp())
        folder.chmod(0o555)
        return folder
    for candidate in ("/sys", "/proc"):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return Path(candidate)
    return None


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "texts.txt").write_text("The cat sat\nHello there\n")
    (root / "texts.csv").write_text("text\nhello\n")
    (root / "a_file").write_text("not a folder\n")
    (root / "not_a_model").mkdir()
    (root / "mypkg").mkdir()
    (root / "mypkg" / "__init__.py").write_text("")
    (root / "mypkg" / "kernels.py").write_text("def fn(module, q, k, v, mask, **kw):\n    return None\n")
    return root


# fmt: off
# (argv, a fragment of the message): checked without the model, so nothing may load (see `no_loading`)
BEFORE_LOADING = [
    (["lens", "", "--model", "llama"], "the prompt is empty"),
    (["lens", "hi", "--model", "{root}/missing"], "does not exist"),
    (["lens", "hi", "--model", "lama"], "Did you mean 'llama'"),
    (["lens", "hi", "--model", "{root}/not_a_model"], "not a saved model"),
    (["lens", "hi", "--model", "{root}/texts.txt"], "not a .gguf file"),
    (["lens", "hi", "--model", "llama", "--html", "{root}"], "is a folder"),
    (["lens", "hi", "--model", "llama", "--html", "{root}/lens.png"], "must end in .html"),
    (["lens", "hi", "--model", "llama", "--html", "{root}/no_such_folder/lens.html"], "does not exist"),
    (["lens", "hi", "--model", "llama", "--html", "{readonly}/lens.html"], "cannot be written"),
    (["lens", "hi", "--model", "llama", "-k", "0"], "argument -k: must be a whole number >= 1"),
    (["demo", "--model", "llama", "--prompt", ""], "--prompt is empty"),
    (["attention", "", "--model", "llama"], "the prompt is empty"),
    (["attention", "hi", "--model", "llama", "--layer", "x"], "argument --layer: invalid int value"),
    (["attention", "hi", "--model", "llama", "--html", "{readonly}/attn.html"], "cannot be written"),
    (["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--target", " Paris", "--model", "llama",
      "--layers", "a,b"], "argument --layers: must be comma-separated layer indices"),
    (["patch", "--clean", "", "--corrupted", "", "--target", " Paris", "--model", "llama"], "--clean is empty"),
    (["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--target", "", "--model", "llama"], "--target is empty"),
    (["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--target", " Paris", "--model", "lama"], "'llama'"),
    (["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--target", " Paris", "--model", "llama",
      "--component", "neurons"], "argument --component: invalid choice"),
    (["cache", "--texts", "{root}/texts.txt", "--names", "layers_output.0", "--out", "{root}/a_file",
      "--model", "llama"], "--out '{root}/a_file' is an existing file"),
    (["cache", "--texts", "{root}/texts.txt", "--names", "layers_output.0", "--out", "{readonly}/store",
      "--model", "llama"], "is not writable"),
    (["cache", "--texts", "{root}/missing.txt", "--names", "layers_output.0", "--out", "{root}/s1",
      "--model", "llama"], "--texts file '{root}/missing.txt' does not exist"),
    (["cache", "--texts", "{root}/texts.csv", "--names", "layers_output.0", "--out", "{root}/s1",
      "--model", "llama"], "unsupported texts file"),
    (["cache", "--texts", "{root}/texts.txt", "--names", "layer_output.0", "--out", "{root}/s1",
      "--model", "llama"], "Did you mean 'layers_output'"),
    (["cache", "--texts", "{root}/texts.txt", "--names", "layers_output", "--out", "{root}/s1",
      "--model", "llama"], "needs a layer after a dot"),
    (["cache", "--texts", "{root}/texts.txt", "--names", "logits.3", "--out", "{root}/s1",
      "--model", "llama"], "one tensor for the whole model"),
    (["cache", "--texts", "{root}/texts.txt", "--names", "attention_scores.0", "--out", "{root}/s1",
      "--model", "llama"], "cannot be cached"),
    (["cache", "--texts", "{root}/texts.txt", "--names", "layers_output.0", "--out", "{root}/s1",
      "--model", "lama"], "Did you mean 'llama'"),
    (["cache", "--texts", "{root}/texts.txt", "--names", "layers_output.0", "--out", "{root}/s1",
      "--batch-size", "0"], "argument --batch-size: must be a whole number >= 1"),
    (["diff", "{root}/missing"], "does not exist"),
    (["diff", "lama"], "Did you mean 'llama'"),
    (["diff", "llama", "--a", "bogus"], "--a 'bogus' is not an attention implementation"),
    (["support", "--types", "lama", "--out", "{root}/support.md"], "Did you mean 'llama'"),
    (["support", "--types", "llama", "--out", "{readonly}/support.md"], "cannot be written"),
    (["attn-check", "--kernel", "no_such_module:fn", "--dtype", "float32"], "cannot load 'no_such_module:fn'"),
    (["attn-check", "--kernel", "mypkg.kernels:missing", "--dtype", "float32"], "cannot load 'mypkg.kernels:missing'"),
    (["attn-check", "--impl", "eager", "--dtype", "float99"], "argument --dtype: invalid choice"),
    (["attn-check", "--impl", "bogus", "--dtype", "float32"], "unknown attention implementation 'bogus'"),
    (["attn-check", "--impl", "eager", "--dtype", "float32", "--case", "no_such_case"], "unknown case"),
]

# checked right after the model loads, before any forward (see `no_forward`)
AFTER_LOADING = [
    (["attention", "hi", "--model", "llama", "--layer", "99"], "--layer 99 is out of range: this llama has 2 layers"),
    (["attention", "hi", "--model", "llama", "--layer", "-3"], "--layer -3 is out of range"),
    (["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--target", " Paris", "--model", "llama",
      "--layers", "0,99"], "--layers 99 is out of range"),
    (["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--target", " Parisian", "--model", "llama"],
     "--target ' Parisian' is 3 tokens [' Paris', 'i', 'an']; the metric is one token's logit"),
    (["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--target", " Paris", "--against", " Romeo",
      "--model", "llama"], "--against ' Romeo' is 2 tokens"),
    (["patch", "--clean", CLEAN, "--corrupted", "The capital of Italy was then", "--target", " Paris",
      "--model", "llama"], "must tokenize to the same length"),
    (["lens", "hi", "--model", "llama", "-k", "1000000"], "-k 1000000 is more than this model's vocabulary"),
    (["cache", "--texts", "{root}/texts.txt", "--names", "layers_output.99", "--out", "{root}/s2",
      "--model", "llama", "--no-progress"], "layer 99 out of range"),
]
# fmt: on


def _fill(argv: list[str], root: Path, readonly: Path | None) -> list[str]:
    if any("{readonly}" in a for a in argv) and readonly is None:
        pytest.skip("no folder this process cannot write to")
    return [a.format(root=root, readonly=readonly) for a in argv]


def _run_main(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def _assert_one_error(rc: int, err: str, fragment: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert fragment in errors[0], err


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any verb loads a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load", refuse)
    monkeypatch.setattr(cli, "_load_hf", refuse)


@pytest.fixture
def no_forward(monkeypatch):
    """Load models as usual, then fail the test on any forward of them."""
    real_load = cli._load
    forwards: list[str] = []

    def load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        model._module.register_forward_pre_hook(lambda module, inputs: forwards.append("forward"))
        return model

    monkeypatch.setattr(cli, "_load", load)
    return forwards


@pytest.mark.parametrize("argv, fragment", BEFORE_LOADING, ids=[" ".join(a[:3]) + f" {i}" for i, (a, _) in
                                                                   enumerate(BEFORE_LOADING)])
def test_argument_errors_are_one_line_before_the_model_loads(argv, fragment, files, no_loading, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(files))  # mypkg.kernels for --kernel
    readonly = _unwritable_dir()
    rc, err = _run_main(_fill(argv, files, readonly), capsys)
    _assert_one_error(rc, err, fragment.format(root=files))


@pytest.mark.parametrize("argv, fragment", AFTER_LOADING, ids=[" ".join(a[:3]) + f" {i}" for i, (a, _) in
                                                                 enumerate(AFTER_LOADING)])
def test_model_dependent_errors_come_before_any_forward(argv, fragment, files, no_forward, capsys):
    rc, err = _run_main(_fill(argv, files, None), capsys)
    _assert_one_error(rc, err, fragment)
    assert "loading a tiny random llama" in err  # the model did load: these checks need it
    assert no_forward == [], "a forward ran before the argument was refused"


def test_python_m_unilens_cache_errors(files, capsys):
    """``python -m unilens.cache`` (`unilens.scale.cli_cache.main`): the same policy, before the model loads."""
    for argv, fragment in [
        ([str(files / "missing.txt"), str(files / "s3"), "--names", "layers_output.0"], "does not exist"),
        ([str(files / "texts.txt"), str(files / "a_file"), "--names", "layers_output.0"], "is an existing file"),
        ([str(files / "texts.txt"), str(files / "s3"), "--names", "bogus.0"], "unknown activation name"),
        ([str(files / "texts.txt"), str(files / "s3"), "--names", "layers_output.0", "--max-length", "0"],
         "must be a whole number >= 1"),
    ]:
        try:
            rc = cli_cache.main(argv)
        except SystemExit as done:  # argparse
            rc = done.code
        _assert_one_error(rc, capsys.readouterr().err, fragment)


# ---------------------------------------------------------------------------------------------------------------
# Correct use: no error, no warning from our code; the same model sources for every verb
# ---------------------------------------------------------------------------------------------------------------


def test_cache_takes_a_model_type_like_every_verb(files, capsys):
    """``unilens cache --model llama`` failed ("neither a local folder nor a model in the local HuggingFace cache")
    while lens and patch took it: one loader for every verb."""
    rc = cli.main(["cache", "--texts", str(files / "texts.txt"), "--names", "layers_output.*", "--out",
                   str(files / "store_ok"), "--model", "llama", "--no-progress"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "ActivationStore(" in out and "llama" in out


@pytest.mark.parametrize("argv", [
    ["lens", CLEAN, "--model", "llama", "--html", "{root}/lens.html"],
    ["attention", CLEAN, "--model", "llama", "--layer", "-1", "--html", "{root}/attn.html"],
    ["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--target", " Paris", "--against", " Rome",
     "--model", "llama", "--layers", "0,-1", "--html", "{root}/patch.html"],
    ["demo", "--model", "llama", "-k", "2"],
    ["cache", "--texts", "{root}/texts.txt", "--names", "layers_output.*", "logits", "--out", "{root}/store_w",
     "--model", "llama", "--no-progress"],
    ["diff", "llama"],
    ["support", "--types", "llama", "--out", "{root}/support/support.md"],
], ids=["lens", "attention", "patch", "demo", "cache", "diff", "support"])
def test_correct_use_runs_without_warnings_from_our_code(argv, files, capsys):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = cli.main(_fill(argv, files, None))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "error:" not in err
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if f"{os.sep}unilens{os.sep}" in w.filename]
    assert ours == [], ours  # e.g. "Converting a tensor with requires_grad=True to a scalar" (cli.py, support.py)


def test_patch_labels_the_token_it_measures(capsys):
    rc = cli.main(["patch", "--clean", CLEAN, "--corrupted", CORRUPTED, "--target", " Paris", "--model", "llama",
                   "--layers", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "metric = logit(' Paris')" in out


# ---------------------------------------------------------------------------------------------------------------
# The policy: user errors are one line, bugs keep their traceback
# ---------------------------------------------------------------------------------------------------------------


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    def broken(model, prompt, k=3):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "lens_table", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["lens", "hi", "--model", "llama"])

    def bug_raising_value_error(model, prompt, k=3):
        return int("not a number")  # a ValueError raised outside unilens's own code: a bug, not a user's mistake

    monkeypatch.setattr(cli, "lens_table", bug_raising_value_error)
    with pytest.raises(ValueError):
        cli.main(["lens", "hi", "--model", "llama"])


def test_user_error_message():
    assert cli_cache.user_error_message(CacheError("bad\nsecond line")) == "bad\n  second line"
    assert cli_cache.user_error_message(KeyError("no such key")) is None  # not raised by unilens's code
    try:
        cli._check_prompt("", "--clean")
    except ValueError as err:
        assert cli_cache.user_error_message(err, cli.CLI_USER_ERRORS).startswith("--clean is empty")
    try:
        raise FileNotFoundError(2, "No such file or directory", "x.txt")
    except OSError as err:  # the OS refused: always the user's to fix
        assert "x.txt" in cli_cache.user_error_message(err)


# ---------------------------------------------------------------------------------------------------------------
# Real processes: exit status through `python -m unilens`, Ctrl-C, nothing loaded before an argument error
# ---------------------------------------------------------------------------------------------------------------

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


def test_subprocess_argument_error_exits_2_before_loading_the_default_model(files):
    """A bad --out with the default model (40-80 s to load SmolLM2): refused before anything loads, so stderr has
    no "loading" / "converting" line (the run takes the import's time only: printed, not asserted)."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "unilens", "cache", "--texts", str(files / "texts.txt"), "--names",
                          "layers_output.0", "--out", str(files / "a_file")], capture_output=True, text=True,
                         env=ENV, cwd=REPO, timeout=300, check=False)  # fmt: skip
    seconds = time.perf_counter() - start
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert run.stderr.startswith("error: --out") and run.stderr.count("\n") == 1, run.stderr
    assert "loading" not in run.stderr and "converting" not in run.stderr, run.stderr
    print(f"argument error: {seconds:.1f} s")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    """SIGINT while `unilens lens` runs: ``interrupted`` and 130, no traceback. --html is a named pipe nobody reads,
    so the process is still running (blocked opening it) whenever the signal comes after its "loading" line."""
    fifo = tmp_path / "lens.html"
    os.mkfifo(fifo)
    # SIGINT as a terminal delivers it: a suite started in the background (`cmd &`, nohup) runs with SIGINT ignored,
    # which its children inherit, and Python keeps an inherited SIG_IGN (no KeyboardInterrupt at all)
    proc = subprocess.Popen([sys.executable, "-m", "unilens", "lens", CLEAN, "--model", "llama", "--html", str(fifo)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        first = proc.stderr.readline()  # printed after the import, as loading starts
        assert first.startswith("loading"), first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err == "interrupted\n", err
