"""nnterp 1.3 itself as the oracle: the same nnterp-API calls on SmolLM2 through nnterp and through unilens.

    bench/.venv-anchors/bin/python bench/nnterp_compare.py nnterp OUT.pt    # nnterp side (never imports unilens)
    .venv/bin/python bench/nnterp_compare.py unilens OUT.pt                 # unilens side: compares, prints a table
    .venv/bin/python bench/nnterp_compare.py                                # both (runs the nnterp side itself)

Both load the same converted SmolLM2 folder (made by ``unilens.load_default()``). Prompts have the same token count
so no padding enters (nnsight 0.7 under nnterp and 0.8 under unilens place padded positions differently). Calls whose
nnterp result is a bug (patchscope_generate with a subset of layers) are called with arguments where nnterp is right.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
PROMPTS = ["The capital of France is", "The capital of Spain is"]
SOURCES = ["The Eiffel Tower", "The Colosseum in"]
TARGETS = ["The pear is so", "The apple is so"]
WORDS = ["Paris", "London", " Rome"]


def run_calls(nnterp, model, tok) -> dict:
    """The nnterp-API calls; ``nnterp`` is the package (nnterp, or unilens imported as nnterp)."""
    from importlib import import_module

    interventions = import_module(nnterp.__name__ + ".interventions")
    utils = import_module(nnterp.__name__ + ".nnsight_utils")
    prompt_utils = import_module(nnterp.__name__ + ".prompt_utils")
    lengths = {len(tok(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) == 1 and len({len(tok(p)["input_ids"]) for p in TARGETS}) == 1, "prompts must not need padding"
    out: dict = {}
    out["get_token_activations"] = utils.get_token_activations(model, PROMPTS, layers=[3, 10])
    out["compute_next_token_probs"] = utils.compute_next_token_probs(model, PROMPTS)
    out["logit_lens"] = interventions.logit_lens(model, PROMPTS)
    out["logit_lens inv"] = interventions.logit_lens(model, PROMPTS, return_inv_logits=True)[1]
    out["repeat_prompt"] = interventions.repeat_prompt().prompt
    out["it_repeat_prompt"] = interventions.it_repeat_prompt(tok).prompt
    out["patchscope_lens"] = interventions.patchscope_lens(model, SOURCES, interventions.repeat_prompt(), layers=[3, 10])
    out["patch_object_attn_lens"] = interventions.patch_object_attn_lens(model, SOURCES, TARGETS, 2, num_patches=2)
    gen = interventions.patchscope_generate(model, SOURCES, interventions.repeat_prompt(), max_length=3)
    out["patchscope_generate"] = torch.stack([gen[layer] for layer in sorted(gen)])
    out["get_first_tokens"] = torch.tensor(prompt_utils.get_first_tokens(WORDS, model))
    prompts = [prompt_utils.Prompt.from_strings(p, {"paris": "Paris", "other": ["London", "Madrid"]}, model)
               for p in PROMPTS]
    quiet = lambda x, **_: x  # noqa: E731  (nnterp's documented tqdm=None raises a TypeError)
    runs = prompt_utils.run_prompts(model, prompts, tqdm=quiet)
    out["run_prompts"] = torch.stack([runs["paris"], runs["other"]])
    lens = prompt_utils.run_prompts(model, prompts, get_probs_func=interventions.logit_lens, tqdm=quiet)
    out["run_prompts logit_lens"] = torch.stack([lens["paris"], lens["other"]])
    h = out["get_token_activations"][1, 0]
    top = model.get_topk_closest_tokens(h, k=5)
    out["get_topk_closest_tokens"] = json.dumps(top)
    return out


def nnterp_side(path: str) -> None:
    import nnterp

    folder = json.loads(Path(path).with_suffix(".json").read_text())["folder"]
    model = nnterp.StandardizedTransformer(folder, device_map="cpu", dtype=torch.float32)
    with torch.no_grad():
        out = run_calls(nnterp, model, model.tokenizer)
    out["versions"] = json.dumps({p: __import__("importlib.metadata").metadata.version(p)
                                  for p in ("nnterp", "nnsight", "transformers", "torch")})
    torch.save(out, path)


def _diff(a, b) -> str:
    if isinstance(a, str):
        if a.startswith("{") and b.startswith("{"):
            x, y = json.loads(a), json.loads(b)
            same_keys = list(x) == list(y)
            err = max(abs(x[k] - y[k]) for k in x) if set(x) == set(y) else float("inf")
            return f"same tokens: {same_keys}, max prob diff {err:.2e}"
        return "equal" if a == b else "DIFFERENT"
    if a.shape != b.shape:
        return f"DIFFERENT shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    if a.dtype in (torch.long, torch.int64, torch.int32):
        return "equal" if torch.equal(a, b) else "DIFFERENT"
    return f"max |diff| {float((a.float() - b.float()).abs().max()):.2e}"


def unilens_side(path: str) -> int:
    import unilens as nnterp

    model = nnterp.load_default()
    with torch.no_grad():
        ours = run_calls(nnterp, model, model.tokenizer)
    theirs = torch.load(path, weights_only=False)
    print(f"nnterp side: {theirs.pop('versions')}")
    print("| call | shape | unilens vs nnterp |\n|---|---|---|")
    bad = 0
    for name, value in ours.items():
        verdict = _diff(value, theirs[name])
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else "str"
        print(f"| `{name}` | {shape} | {verdict} |")
        if "DIFFERENT" in verdict or ("max" in verdict and float(verdict.split()[-1]) > 1e-4):
            bad += 1
    return 1 if bad else 0


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "nnterp":
        nnterp_side(sys.argv[2])
        return 0
    from unilens.arch.loading import default_model_path, gguf_cache_dir

    path = sys.argv[2] if len(sys.argv) == 3 else str(Path("/tmp") / "nnterp_compare.pt")
    if len(sys.argv) != 3:
        import unilens

        unilens.load_default()  # makes the converted folder
        Path(path).with_suffix(".json").write_text(json.dumps({"folder": str(gguf_cache_dir(default_model_path()))}))
        subprocess.run([str(HERE / ".venv-anchors" / "bin" / "python"), __file__, "nnterp", path], check=True)
    return unilens_side(path)


if __name__ == "__main__":
    sys.exit(main())
