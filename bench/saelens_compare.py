"""unilens beside SAELens on SAELens's own caching job, and SAELens training from a unilens export.

    .venv/bin/python bench/saelens_compare.py [--texts 300] [--context-size 128] [--layer 3] [--reps 3]

What it does, in one run (SAELens in its own virtualenv, bench/.venv-saelens, built by `--build-venv`):

1. Writes ``--texts`` deterministic English-like texts as a ``datasets`` folder (the input both sides read).
2. Starts two long-lived workers, each loading SmolLM2 (the safetensors copy of the embedded model, float32, CPU)
   once: SAELens's ``CacheActivationsRunner`` (``model_class_name="AutoModelForCausalLM"``, hook ``model.layers.<L>``,
   ``prepend_bos=True``, BOS separators, no shuffle) in bench/.venv-saelens, and unilens's ``cache_activations(...,
   context_size=C)`` + ``export_to_datasets(..., column_names="hf")`` in .venv. The two jobs alternate, first one
   then the other, ``--reps`` times after a warm-up round each; each rep writes a fresh folder; tokens/s is each
   side's cached tokens over its wall time (the model load excluded on both sides).
3. Compares the two caches: the same token ids context for context, and the activations' max abs difference.
4. Trains an SAE with SAELens's ``LanguageModelSAETrainingRunner`` from the unilens export
   (``use_cached_activations=True``, default options except the sizes a tiny dataset needs) and prints its losses.

Prints a markdown section, and with ``--write`` puts it in bench/RESULTS.md between its markers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SAELENS_PYTHON = HERE / ".venv-saelens" / "bin" / "python"
START, END = "<!-- saelens:start -->", "<!-- saelens:end -->"

# ------------------------------------------------------------------------------------------------------------------
# Texts
# ------------------------------------------------------------------------------------------------------------------

_WORDS = {
    "det": ["the", "a", "every", "this", "that", "one", "our", "their"],
    "adj": ["small", "old", "bright", "quiet", "green", "heavy", "early", "strange", "careful", "narrow", "warm"],
    "noun": ["river", "teacher", "garden", "machine", "city", "letter", "window", "farmer", "road", "storm",
             "library", "engine", "child", "market", "bridge", "song", "mountain", "doctor", "ship", "forest"],
    "verb": ["watched", "crossed", "built", "found", "opened", "carried", "followed", "painted", "remembered",
             "repaired", "visited", "described", "measured", "closed"],
    "adv": ["slowly", "again", "together", "quietly", "at last", "every morning", "before noon", "without a word"],
    "prep": ["near", "behind", "across", "under", "beside", "beyond", "through"],
    "conj": ["and then", "but", "because", "while", "so"],
}


def make_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` texts of 1 to 4 sentences drawn from a small grammar with a fixed seed: English-like, varied in length
    (about 10 to 80 tokens), the same on every run."""
    rng = random.Random(seed)
    w = lambda kind: rng.choice(_WORDS[kind])  # noqa: E731

    def sentence() -> str:
        s = f"{w('det')} {w('adj')} {w('noun')} {w('verb')} {w('det')} {w('noun')}"
        if rng.random() < 0.6:
            s += f" {w('prep')} {w('det')} {w('adj')} {w('noun')}"
        if rng.random() < 0.5:
            s += f" {w('adv')}"
        if rng.random() < 0.4:
            s += f", {w('conj')} {w('det')} {w('noun')} {w('verb')} it"
        return s[0].upper() + s[1:] + rng.choice([".", ".", ".", "!", "?"])

    return [" ".join(sentence() for _ in range(rng.randint(1, 4))) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------------------
# Workers: one process per side, loading the model once, then serving "run <folder>" lines on stdin
# ------------------------------------------------------------------------------------------------------------------


def _serve(run_one) -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "quit":
            return
        print(json.dumps(run_one(Path(arg))), flush=True)


def saelens_worker(args: argparse.Namespace) -> None:
    """SAELens's CacheActivationsRunner, as its docs configure it for an HF model; the runner is built once (it loads
    the model) and each run gets a fresh activations store and output folder, as a new runner would."""
    import datasets
    import torch
    from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig
    from sae_lens.cache_activations_runner import _mk_activations_store

    torch.set_num_threads(args.threads)
    texts = datasets.load_from_disk(args.texts_dir)
    tokens = args.contexts * args.context_size
    bytes_per_token = args.d_in * 4
    cfg = CacheActivationsRunnerConfig(
        dataset_path=args.texts_dir, model_name=args.model, model_class_name="AutoModelForCausalLM",
        hook_name=f"model.layers.{args.layer}", d_in=args.d_in, context_size=args.context_size,
        model_batch_size=args.batch_size, training_tokens=tokens, new_cached_activations_path=args.scratch,
        shuffle=False, dtype="float32", device="cpu", prepend_bos=True, streaming=False,
        # one buffer of exactly the tokens to cache: SAELens fills every buffer in full, restarting the dataset
        # when it runs out, so a larger buffer would cache the texts again
        buffer_size_gb=(tokens * bytes_per_token + bytes_per_token // 2) / 1e9,
    )  # fmt: skip
    runner = CacheActivationsRunner(cfg, override_dataset=texts)
    assert cfg.n_buffers == 1 and cfg.n_batches_in_buffer * args.batch_size == args.contexts

    def run_one(out: Path) -> dict[str, Any]:
        start = time.perf_counter()
        runner.cfg.new_cached_activations_path = str(out)
        runner.activations_store = _mk_activations_store(runner.model, runner.cfg, override_dataset=texts)
        dataset = runner.run()
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens": len(dataset) * args.context_size}

    _serve(run_one)


def unilens_worker(args: argparse.Namespace) -> None:
    """unilens: ``cache_activations`` in SAELens's mode, then ``export_to_datasets`` with HF module names."""
    import datasets
    import torch

    import unilens
    from unilens.scale.sae import export_to_datasets

    torch.set_num_threads(args.threads)
    texts = list(datasets.load_from_disk(args.texts_dir)["text"])
    model = unilens.StandardizedTransformer(args.model, dtype=torch.float32)

    def run_one(out: Path) -> dict[str, Any]:
        start = time.perf_counter()
        store = unilens.cache_activations(model, texts, [f"layers_output.{args.layer}"], out / "store",
                                          context_size=args.context_size, batch_size=args.batch_size,
                                          progress=False)  # fmt: skip
        cached = time.perf_counter()
        info = export_to_datasets(store, out / "hf", column_names="hf")
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "cache_seconds": cached - start, "tokens": info["tokens"],
                "contexts": info["contexts"]}  # fmt: skip

    _serve(run_one)


def train_worker(args: argparse.Namespace) -> None:
    """SAELens's LanguageModelSAETrainingRunner from a cached-activation folder (``args.cached``): default options,
    except wandb off, and the sizes a dataset of a few hundred contexts needs; prints the loss of every step."""
    import datasets
    import torch
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    losses: list[dict[str, float]] = []
    step = SAETrainer.step

    def recording_step(self, batch):  # SAETrainer.step, its losses noted
        output = step(self, batch)
        losses.append({"loss": float(output.loss.item()),
                       **{k: float(v.item() if hasattr(v, "item") else v) for k, v in output.losses.items()}})
        return output

    SAETrainer.step = recording_step
    n_contexts = len(datasets.load_from_disk(args.cached))
    batch_tokens = 512
    cfg = LanguageModelSAERunnerConfig(
        sae=StandardTrainingSAEConfig(d_in=args.d_in, d_sae=4 * args.d_in),
        model_name=args.model, model_class_name="AutoModelForCausalLM", hook_name=f"model.layers.{args.layer}",
        dataset_path=args.texts_dir, is_dataset_tokenized=False, context_size=args.context_size,
        use_cached_activations=True, cached_activations_path=args.cached,
        # sized to the tiny dataset: a buffer of 8 contexts (SAELens's default, 32 x 20, is more than it holds)
        store_batch_size_prompts=4, n_batches_in_buffer=4, train_batch_size_tokens=batch_tokens,
        training_tokens=args.train_steps * batch_tokens, device="cpu", logger=LoggingConfig(log_to_wandb=False),
        output_path=None, checkpoint_path=None,
    )  # fmt: skip
    texts = datasets.load_from_disk(args.texts_dir)
    sae = LanguageModelSAETrainingRunner(cfg, override_dataset=texts).run()
    print(json.dumps({"losses": losses, "contexts": n_contexts, "d_sae": int(sae.cfg.d_sae)}), flush=True)


# ------------------------------------------------------------------------------------------------------------------
# The comparison
# ------------------------------------------------------------------------------------------------------------------


def _worker_env() -> dict[str, str]:
    """Offline (the HF Hub is never asked), no wandb, unilens importable from the checkout."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}


class _Worker:
    def __init__(self, python: Path, mode: str, args: list[str]):
        self.proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), "--worker", mode, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_worker_env(),
                                     cwd=ROOT)  # fmt: skip
        self.mode = mode
        self.read()  # ready

    def read(self) -> dict[str, Any]:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the {self.mode} worker exited (code {self.proc.wait()}); see its stderr above")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, out: Path) -> dict[str, Any]:
        self.proc.stdin.write(f"run {out}\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def _median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def compare(args: argparse.Namespace) -> list[str]:
    import datasets
    import numpy as np

    import unilens
    from unilens.arch.loading import gguf_cache_dir
    from unilens.scale.plan import _pack

    if not SAELENS_PYTHON.exists():
        raise SystemExit(f"no SAELens virtualenv at {SAELENS_PYTHON.parent.parent}: run with --build-venv first.")
    unilens.load_default()  # writes the safetensors copy of the embedded model, if not there yet
    model_dir = str(gguf_cache_dir(unilens.default_model_path()))
    root = Path(tempfile.mkdtemp(prefix="unilens-saelens-"))
    texts = make_texts(args.texts)
    texts_dir = root / "texts"
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(texts_dir))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    packed = _pack(tokenizer, texts, args.context_size)
    # SAELens caches whole batches of model_batch_size contexts: both sides get a multiple of it
    contexts = len(packed.text_index) // args.batch_size * args.batch_size
    texts_kept = texts
    if contexts < len(packed.text_index):  # drop texts from the end until the packing gives exactly that many
        lo = 1
        while len(_pack(tokenizer, texts[: len(texts) - lo], args.context_size).text_index) > contexts:
            lo += 1
        texts_kept = texts[: len(texts) - lo]
        if len(_pack(tokenizer, texts_kept, args.context_size).text_index) != contexts:
            texts_kept = texts  # cannot hit it exactly: compare the first `contexts` contexts
    datasets.Dataset.from_dict({"text": texts_kept}).save_to_disk(str(root / "texts_kept"))
    common = ["--model", model_dir, "--texts-dir", str(root / "texts_kept"), "--layer", str(args.layer),
              "--context-size", str(args.context_size), "--batch-size", str(args.batch_size),
              "--threads", str(args.threads), "--contexts", str(contexts), "--d-in", "576",
              "--scratch", str(root / "scratch")]  # fmt: skip
    print(f"# {len(texts_kept)} texts, {contexts} contexts of {args.context_size} tokens; workers loading ...",
          file=sys.stderr, flush=True)  # fmt: skip
    workers = {"SAELens": _Worker(SAELENS_PYTHON, "saelens", common),
               "unilens": _Worker(Path(sys.executable), "unilens", common)}  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in workers}
    last: dict[str, Path] = {}
    try:
        for rep in range(args.reps + 1):  # round 0 warms up
            order = list(workers) if rep % 2 == 0 else list(workers)[::-1]
            for name in order:
                out = root / f"{name}-{rep}"
                result = workers[name].run(out)
                print(f"# rep {rep} {name}: {result}", file=sys.stderr, flush=True)
                if rep:
                    results[name].append(result)
                if name in last:
                    shutil.rmtree(last[name], ignore_errors=True)
                last[name] = out
    finally:
        for worker in workers.values():
            worker.close()

    # equality: SAELens's cache and unilens's export, context for context
    theirs = datasets.load_from_disk(str(last["SAELens"])).with_format("numpy")
    ours = datasets.load_from_disk(str(last["unilens"] / "hf")).with_format("numpy")
    column = f"model.layers.{args.layer}"
    n = min(len(theirs), len(ours))
    theirs, ours = theirs[:n], ours[:n]  # {column: array}
    ids_equal = bool(np.array_equal(theirs["token_ids"], ours["token_ids"]))
    diff = float(np.abs(theirs[column] - ours[column]).max())
    scale = float(np.abs(theirs[column]).max())
    norms = np.linalg.norm(ours[column], axis=-1)  # (contexts, context_size)
    bos = tokenizer.bos_token_id
    first, sep = norms[:, 0].mean(), norms[:, 1:][ours["token_ids"][:, 1:] == bos].mean()
    rest = norms[:, 1:][ours["token_ids"][:, 1:] != bos].mean()

    # training from the unilens export
    train = subprocess.run([str(SAELENS_PYTHON), str(Path(__file__).resolve()), "--worker", "train", *common,
                            "--cached", str(last["unilens"] / "hf"), "--train-steps", str(args.train_steps)],
                           capture_output=True, text=True, cwd=ROOT,
                           env=_worker_env())  # fmt: skip
    trained = [json.loads(line) for line in train.stdout.splitlines() if line.startswith("{")]
    if train.returncode or not trained:
        sys.stderr.write(train.stderr[-4000:])
        raise SystemExit(f"SAELens training from the unilens export failed (code {train.returncode})")
    losses = [step["loss"] for step in trained[0]["losses"]]
    shutil.rmtree(root, ignore_errors=True)

    rate = {name: [r["tokens"] / r["seconds"] for r in results[name]] for name in results}
    cache_rate = [r["tokens"] / r["cache_seconds"] for r in results["unilens"]]
    ratio = _median(rate["unilens"]) / _median(rate["SAELens"])
    paired = _median([u / s for u, s in zip(rate["unilens"], rate["SAELens"])])
    tokens = results["unilens"][0]["tokens"]
    every = max(1, len(losses) // 8)
    fmt = lambda xs: f"{_median(xs):,.0f} ({min(xs):,.0f} - {max(xs):,.0f})"  # noqa: E731
    return [
        START,
        f"## SAELens's caching job: unilens beside SAELens's `CacheActivationsRunner` ({_saelens_version()})",
        "",
        f"bench/saelens_compare.py: {len(texts_kept)} of {len(texts)} generated English-like texts (the most that "
        f"fill whole batches of {args.batch_size} contexts: SAELens caches whole batches) packed into {contexts} "
        f"contexts of {args.context_size} tokens ({tokens} tokens: BOS first, BOS between texts, the last partial context "
        f"dropped), SmolLM2-135M's layer {args.layer} residual (`model.layers.{args.layer}` / "
        f"`layers_output.{args.layer}`), float32, CPU, {args.threads} torch threads, {args.batch_size} contexts per "
        "forward. Each side is a long-lived process that loaded the model once; the two jobs alternate "
        f"(first one, then the other), {args.reps} reps after a warm-up each. SAELens: `CacheActivationsRunner.run()` "
        "with `model_class_name=\"AutoModelForCausalLM\"`, `shuffle=False` (a fresh activations store and folder "
        "each rep). unilens: `cache_activations(..., context_size=C)` to a fresh store, then "
        "`export_to_datasets(..., column_names=\"hf\")`: both end in a `datasets` folder SAELens trains from.",
        "",
        "| job | tokens/s, median (min - max) | unilens / SAELens |",
        "|---|---:|---:|",
        f"| SAELens `CacheActivationsRunner` | {fmt(rate['SAELens'])} | baseline |",
        f"| unilens `cache_activations` + `export_to_datasets` | {fmt(rate['unilens'])} | **{ratio:.2f}x** "
        f"(paired {paired:.2f}x) |",
        f"| unilens `cache_activations` alone | {fmt(cache_rate)} | |",
        "",
        f"- equality: the same token ids in every context ({ids_equal}); activations max abs diff {diff:.2e} "
        + ("(bitwise equal" if diff == 0 else "(float32 rounding") + f"; largest |activation| {scale:.1f}).",
        f"- mean residual norm at layer {args.layer}: position 0 (BOS) {first:.1f}, BOS separators {sep:.1f}, "
        f"other tokens {rest:.1f}.",
        f"- SAELens `LanguageModelSAETrainingRunner` (`use_cached_activations=True`, default options but the buffer "
        f"sizes a {contexts}-context dataset needs and wandb off) trained a {trained[0]['d_sae']}-latent SAE from the "
        f"unilens export; loss, every {every} steps of {len(losses)}: "
        + ", ".join(f"{x:,.0f}" for x in losses[::every]) + f", last {losses[-1]:,.0f}; mean of the first 5 steps "
        f"{sum(losses[:5]) / 5:,.0f}, of the last 5 {sum(losses[-5:]) / 5:,.0f}.",
        END,
    ]


def _saelens_version() -> str:
    out = subprocess.run([str(SAELENS_PYTHON), "-c", "import sae_lens, transformers, torch; "
                          "print(sae_lens.__version__, transformers.__version__, torch.__version__)"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip()


def build_venv() -> None:
    """bench/.venv-saelens: torch 2.13 and the newest sae-lens 6.54.x (sae-lens pins transformer-lens < 4)."""
    venv = HERE / ".venv-saelens"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "torch==2.13.0", "sae-lens>=6.54,<6.55"], check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["saelens", "unilens", "train"], help=argparse.SUPPRESS)
    p.add_argument("--texts", type=int, default=300)
    p.add_argument("--context-size", type=int, default=128)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8, help="contexts per forward, both sides")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--write", action="store_true", help="put the section in bench/RESULTS.md")
    p.add_argument("--build-venv", action="store_true", help="create bench/.venv-saelens, then exit")
    for name in ("--model", "--texts-dir", "--scratch", "--cached"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--contexts", type=int, help=argparse.SUPPRESS)
    p.add_argument("--d-in", type=int, default=576, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build_venv:
        build_venv()
        return 0
    if args.worker:
        {"saelens": saelens_worker, "unilens": unilens_worker, "train": train_worker}[args.worker](args)
        return 0
    lines = compare(args)
    print("\n".join(lines))
    if args.write:
        path = HERE / "RESULTS.md"
        text = path.read_text() if path.exists() else ""
        block = "\n".join(lines).rstrip("\n")
        if START in text and END in text:
            head, rest = text.split(START, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
