"""The support report: every zoo architecture loaded, validated against HF and checked for attention probabilities."""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..arch.discovery import discover, probe_position_embedding
from ..model.remote import REMOTE_TABLE_NAMES, remote_support
from ..model.transformer import StandardizedTransformer
from ..model.validation import hf_reference_forward, validate_model
from ..testing import all_causal_model_types, tiny_model

__all__ = ["SupportRow", "check_model_type", "support_report", "write_support_report"]

PROMPTS = ["The capital of France is", "A cat sat on the mat and"]


@dataclass
class SupportRow:
    """One architecture's line in the support report."""

    model_type: str
    builds: bool
    loads: bool = False
    residual_matches: bool = False
    residual_max_err: float | None = None
    attention_layers: int = 0
    hf_returns_attentions: bool = False
    attention_probs: str = "-"  # "match", "mismatch", "unsupported: ...", "-" (no HF oracle)
    attention_max_err: float | None = None
    parallel: bool = False
    note: str = ""


def _hf_attentions(model_type: str, enc) -> tuple | None:
    try:
        eager, _ = tiny_model(model_type, attn_implementation="eager")
        out = hf_reference_forward(eager, dict(enc), output_attentions=True)
    except Exception:
        return None
    attentions = getattr(out, "attentions", None)
    if not attentions or not all(isinstance(a, torch.Tensor) and a.dim() == 4 for a in attentions):
        return None
    return attentions


def check_model_type(model_type: str) -> SupportRow:
    """Build the tiny ``model_type``, load it with unilens, and compare with HF's own outputs.

    Example:
        >>> row = check_model_type("llama")
        >>> row.residual_matches, row.attention_probs
        (True, 'match')
    """
    try:
        hf, tok = tiny_model(model_type)
    except Exception as err:
        return SupportRow(model_type, builds=False, note=f"build: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
    row = SupportRow(model_type, builds=True)
    try:
        model = StandardizedTransformer(hf, tokenizer=tok, check=False)
        row.loads = True
    except Exception as err:
        row.note = f"load: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
        return row
    row.parallel = model.architecture.parallel
    try:
        report = validate_model(model, raise_on_error=False)
        row.residual_max_err = max(report.errors.values())
        row.residual_matches = report.ok
        if not report.ok:
            worst = max(report.errors, key=report.errors.get)
            row.note = f"residual: {worst}"
    except Exception as err:
        row.note = f"validate: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    layers = model.architecture.attention_layers
    row.attention_layers = len(layers)
    if not layers:
        row.attention_probs = "unsupported: no softmax attention"
        return row
    enc = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    reference = _hf_attentions(model_type, enc)
    row.hf_returns_attentions = reference is not None
    probs: list[torch.Tensor] = []
    try:
        with model.trace({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}):
            for i in layers:
                probs.append(model.attention_probabilities[i].save())
    except Exception as err:
        row.attention_probs = f"unsupported: {type(err).__name__}: {str(err).splitlines()[0][:120]}"
        return row
    if reference is None:
        return row
    if len(reference) == model.num_layers:
        reference = [reference[i] for i in layers]
    if len(reference) != len(probs):
        row.attention_probs = f"mismatch: HF returned {len(reference)} maps for {len(probs)} attention layers"
        return row
    mask = enc["attention_mask"].bool()
    err = 0.0
    for ours, theirs in zip(probs, reference):
        if ours.shape != theirs.shape:
            row.attention_probs = f"mismatch: shape {tuple(ours.shape)} vs HF {tuple(theirs.shape)}"
            return row
        # padded queries/keys carry no meaning; keys past the sequence (DeepSeek-V4 appends compressed keys
        # after the token keys) are never padding
        extra = ours.shape[-1] - mask.shape[1]
        key_mask = torch.cat([mask, mask.new_ones(mask.shape[0], max(extra, 0))], dim=1)
        real = mask[:, None, :, None] & key_mask[:, None, None, :]
        err = max(err, float(((ours - theirs).abs() * real).max().detach()))
    row.attention_max_err = err
    row.attention_probs = "match" if err <= 1e-5 else "mismatch"
    return row


def support_report(model_types: list[str] | None = None, progress: bool = True) -> list[SupportRow]:
    """Run ``check_model_type`` over ``model_types`` (default: every causal-LM type transformers maps).

    Example:
        >>> rows = support_report(["gpt2", "llama"], progress=False)
        >>> [r.residual_matches for r in rows]
        [True, True]
    """
    types = model_types or all_causal_model_types()
    rows = []
    iterator = types
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(types, desc="support", unit="model")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: thread start-up costs more than it saves
    try:
        for model_type in iterator:
            try:
                rows.append(check_model_type(model_type))
            except Exception as err:  # one architecture never stops the report
                rows.append(SupportRow(model_type, builds=False, note=f"crash: {type(err).__name__}: {err}"[:200]))
                traceback.print_exc()
    finally:
        torch.set_num_threads(previous)
    return rows


def _summary(rows: list[SupportRow]) -> dict[str, int]:
    built = [r for r in rows if r.builds]
    with_oracle = [r for r in built if r.hf_returns_attentions]
    return {
        "model_types": len(rows),
        "build": len(built),
        "load": sum(r.loads for r in built),
        "residual_matches_hf": sum(r.residual_matches for r in built),
        "hf_returns_attentions": len(with_oracle),
        "attention_probs_match_hf": sum(r.attention_probs == "match" for r in with_oracle),
    }


def write_support_report(path: str | Path = "docs/support.md", model_types: list[str] | None = None) -> dict[str, int]:
    """Regenerate the support table (Markdown at ``path``, JSON beside it) and return the summary counts.

    Example:
        >>> write_support_report("/tmp/support.md", ["gpt2"])["residual_matches_hf"]
        1
    """
    import importlib.metadata as md

    start = time.time()
    rows = support_report(model_types)
    summary = _summary(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    versions = {p: md.version(p) for p in ("torch", "transformers", "nnsight")}
    path.with_suffix(".json").write_text(
        json.dumps({"versions": versions, "summary": summary, "rows": [asdict(r) for r in rows]}, indent=1) + "\n"
    )
    s = summary
    lines = [
        "# Architecture support",
        "",
        "Generated by `unilens support` (do not edit by hand): every causal-LM model type transformers maps, built",
        "tiny from its config with random weights, loaded with `StandardizedTransformer`, and compared with HF's own",
        "outputs: the residual stream with `output_hidden_states`, attention probabilities with an eager",
        "`output_attentions=True` forward of the same weights (max abs error over real tokens, fp32).",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}. Took {time.time() - start:.0f} s.",
        "",
        f"- model types: **{s['model_types']}**; build tiny: **{s['build']}**; load: **{s['load']}**",
        f"- residual stream matches HF: **{s['residual_matches_hf']} / {s['build']}**",
        f"- attention probabilities match HF eager: **{s['attention_probs_match_hf']} / {s['hf_returns_attentions']}** "
        "(types whose HF eager forward returns attention maps)",
        "",
        "| model type | loads | residual = HF | max err (x tol) | attention layers | probabilities vs HF eager | max err | parallel | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fmt = lambda v: "" if v is None else f"{v:.1e}"  # noqa: E731
        lines.append(
            f"| {r.model_type} | {'yes' if r.loads else ('no' if r.builds else 'does not build')} | "
            f"{'yes' if r.residual_matches else ('no' if r.loads else '')} | {fmt(r.residual_max_err)} | "
            f"{r.attention_layers or ''} | {r.attention_probs} | {fmt(r.attention_max_err)} | "
            f"{'yes' if r.parallel else ''} | {r.note.replace('|', '/')} |"
        )
    path.write_text("\n".join(lines) + "\n")
    return summary


def support_table(model_types: Sequence[str]) -> str:
    """The markdown table of docs/remote.md: one row per model type, one column per accessor (``unilens.hook_points``
    as one column), each cell ``yes`` / ``refused`` / ``n/a``; built from ``remote_support`` on each tiny model.

    Example:
        >>> support_table(["llama"]).splitlines()[2].startswith("| llama | yes | yes |")
        True
    """
    from types import SimpleNamespace

    names = [*REMOTE_TABLE_NAMES, "hook_points"]
    lines = ["| model type | " + " | ".join(f"`{n}`" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for model_type in model_types:
        hf = tiny_model(model_type)[0]
        arch = discover(hf)
        probe_position_embedding(hf, arch)  # a data-flow finding: structure alone does not say
        support = remote_support(SimpleNamespace(architecture=arch))
        cells = [support[n].split(":")[0].replace("supported", "yes") for n in names]
        lines.append(f"| {model_type} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
