"""The support report: every zoo architecture loaded, validated against HF and checked for attention probabilities."""

from __future__ import annotations

import json
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from nnsight import NNsight

from ..arch.discovery import discover, probe_position_embedding
from ..core.config import num_attention_heads
from ..model.remote import REMOTE_TABLE_NAMES, attention_plans, remote_support
from ..model.transformer import StandardizedTransformer
from ..model.validation import hf_reference_forward, validate_model
from ..testing import all_causal_model_types, tiny_model
from .routing import routing_check

__all__ = ["KNOWN_LIMITATIONS", "SupportRow", "check_model_type", "fully_supported", "support_report", "with_reason",
           "write_support_report"]

PROMPTS = ["The capital of France is", "A cat sat on the mat and"]

# Why a model type is not supported (or only in part), where that is what the architecture does rather than a bug
# unilens could fix: shown in the report's reason column instead of the exception. Each entry names what the model
# does that the standardized view (one residual stream per decoder layer computed from token ids alone, layers run
# once each, one unembedding) cannot express, or the dependency it needs. tests/test_transformers_525.py checks that
# every entry still fails (no stale reason) and that every failing row has a reason.
KNOWN_LIMITATIONS: dict[str, str] = {
    # several stacks of different sequence lengths in one forward
    "blt": "byte-level local encoder, patch-level global transformer and local decoder in one forward: HF's hidden "
           "states mix the three stacks (bytes and patches), so no one layer list is the residual stream",
    # layers run more than once per forward: a layer index does not name one residual stream
    "hrm_text": "hierarchical recurrent model: its H and L modules run their layers for several cycles per forward "
                "(HF returns 17 hidden states for 2 layers), so a layer index names no single residual stream",
    "dory": "looped (recurrent-depth) model: its middle layers run n_recurrent_loops times per forward, so a layer "
            "index names no single residual stream",
    # more positions than tokens, or several streams
    # the residual stream matches (HF's hidden states: the reversible layers' hidden_states stream); the attention
    # probabilities do not exist as a (query, key) map
    "reformer": "attention probabilities: its LSH attention hashes keys into random buckets and its local attention "
                "scores each chunk against neighbouring chunks (exp(scores - logsumexp), no softmax call), so no "
                "(query, key) map; padded batches also fail inside transformers (ReformerModel's chunk padding "
                "breaks on the position_ids a padded trace passes)",
    # not buildable or not runnable alone
    "gemma3n": "its vision tower is a timm model: building it needs timm and pillow, which unilens does not depend "
               "on (gemma3n_text, the language model alone, is supported)",
    "gemma4_assistant": "a speculative-decoding drafter: every layer attends to the keys and values of the main "
                        "Gemma 4 model, so it cannot be built or run from token ids alone",
    "gemma4_unified_assistant": "a speculative-decoding drafter: every layer attends to the keys and values of the "
                                "main Gemma 4 model, so it cannot be built or run from token ids alone",
}


@dataclass
class SupportRow:
    """One architecture's line in the support report."""

    model_type: str
    builds: bool
    loads: bool = False
    residual_matches: bool = False
    residual_max_err: float | None = None
    attention_layers: int = 0
    # layers whose token mixer is not softmax attention (an SSM, recurrent or linear-attention block: mixers_output)
    other_mixer_layers: int = 0
    hf_returns_attentions: bool = False
    attention_probs: str = "-"  # "match", "mismatch", "unsupported: ...", "-" (no HF oracle)
    attention_max_err: float | None = None
    parallel: bool = False
    note: str = ""
    reason: str = ""  # why the row is not fully supported: KNOWN_LIMITATIONS, else the failure in one line
    routing: str = "-"  # MoE types: router_logits vs HF's output_router_logits (unilens.conformance.routing)


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
    row.routing = routing_check(model)  # "-" without a sparse MoE block
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
    row.other_mixer_layers = sum(p.mixer is not None and p.mixer != p.attention for p in model.architecture.layers)
    if not layers:  # no softmax attention, or one the accessors cannot reach (Architecture.attention_refusal)
        row.attention_probs = f"unsupported: {model.architecture.attention_refusal or 'no softmax attention'}"
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
    p = model.architecture.prefix_positions  # HF's maps keep the input's queries and keys (CPM-Ant drops its prompt)
    for ours, theirs in zip(probs, reference):
        ours = ours[..., p:, p:]
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
                rows.append(with_reason(check_model_type(model_type)))
            except Exception as err:  # one architecture never stops the report
                rows.append(SupportRow(model_type, builds=False, note=f"crash: {type(err).__name__}: {err}"[:200]))
                traceback.print_exc()
    finally:
        torch.set_num_threads(previous)
    return rows


def fully_supported(row: SupportRow) -> bool:
    """Whether a row passes everything the report checks: built, loaded, residual = HF, and attention probabilities
    equal to HF eager's (or no softmax attention / no HF oracle)."""
    attention_ok = row.attention_probs in ("match", "-", "unsupported: no softmax attention")
    return row.builds and row.loads and row.residual_matches and attention_ok


def with_reason(row: SupportRow) -> SupportRow:
    """``row`` with its reason set: empty when fully supported, else the ``KNOWN_LIMITATIONS`` entry of its type, else
    what failed, in one line (the first failed step of ``note``, or the attention result).

    Example:
        >>> with_reason(SupportRow("blt", builds=True, loads=True)).reason.startswith("byte-level")
        True
    """
    if fully_supported(row):
        row.reason = ""
    elif row.model_type in KNOWN_LIMITATIONS:
        row.reason = KNOWN_LIMITATIONS[row.model_type]
    else:
        row.reason = " ".join((row.note or row.attention_probs).split())[:200]
    return row


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
        "recurrent_or_hybrid": sum(r.other_mixer_layers > 0 for r in built),
        "recurrent_or_hybrid_residual_matches_hf": sum(r.residual_matches for r in built if r.other_mixer_layers > 0),
        "moe": sum(r.routing != "-" for r in built),
        "moe_router_logits_match_hf": sum(r.routing.startswith("match") for r in built),
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
        f"- recurrent / state-space / hybrid types (layers whose token mixer is not softmax attention): "
        f"**{s['recurrent_or_hybrid']}**, residual stream matches HF on **{s['recurrent_or_hybrid_residual_matches_hf']}**",
        f"- mixture-of-experts types: **{s['moe']}**; `router_logits` = HF's `output_router_logits` on "
        f"**{s['moe_router_logits_match_hf']}**",
        "",
        "The reason column says why a row is not fully supported: what the architecture does that the standardized",
        "view cannot express (`KNOWN_LIMITATIONS` in unilens/conformance/support.py), else the check that failed.",
        "",
        "| model type | loads | residual = HF | max err (x tol) | attention layers | other mixer layers | "
        "probabilities vs HF eager | max err | parallel | routing vs HF | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fmt = lambda v: "" if v is None else f"{v:.1e}"  # noqa: E731
        lines.append(
            f"| {r.model_type} | {'yes' if r.loads else ('no' if r.builds else 'does not build')} | "
            f"{'yes' if r.residual_matches else ('no' if r.loads else '')} | {fmt(r.residual_max_err)} | "
            f"{r.attention_layers or ''} | {r.other_mixer_layers or ''} | {r.attention_probs} | "
            f"{fmt(r.attention_max_err)} | {'yes' if r.parallel else ''} | {'' if r.routing == '-' else r.routing} | "
            f"{r.reason.replace('|', '/')} |"
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
        # where the server's attention code computes each attention tensor (nnsight .source of the plain HF model)
        plans = attention_plans(NNsight(hf), arch, num_attention_heads(hf.config))
        support = remote_support(SimpleNamespace(architecture=arch, attention_plans=plans))
        cells = [support[n].split(":")[0].replace("supported", "yes") for n in names]
        lines.append(f"| {model_type} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
