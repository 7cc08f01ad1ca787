"""Generation with interventions (unilens.generation and nnsight's generate loop) against a no-cache reference.

Oracle: the whole sequence recomputed at every step by a separate eager copy of the same weights, read with plain
torch hooks and HF's own `output_attentions` (no unilens hook point in the read path). A cached step k > 0 is the
reference's last position; step 0 is the reference's real (non-padding) positions. fp32, so 1e-5 (torch.testing's
fp32 atol; cached and recomputed kernels sum in other orders, ~1e-7 here).
"""

from __future__ import annotations

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.analysis.generation import Steering, generate
from unilens.arch.discovery import ModuleMap, discover
from unilens.hooks.attention import find_output_projection, install_attention_hooks
from unilens.hooks.steering import NonFiniteSteeringError
from unilens.model.validation import hf_reference_forward
from unilens.testing import ZOO_REQUIRED, tiny_model

PROMPTS = ["The capital of France is", "A cat sat"]  # left-padded batch: the second row is shorter
STEPS = 5
TOL = 1e-5


def _models(model_type: str):
    model, tok = tiny_model(model_type)
    eager, _ = tiny_model(model_type, attn_implementation="eager")
    eager.load_state_dict(model.state_dict())
    return StandardizedTransformer(model, tokenizer=tok, check=False), eager, tok


def _reference(eager, tokens: torch.Tensor, prompt_mask: torch.Tensor, layer: int, steps: int, edit=None):
    """Per step: (probabilities, z, layer output, last logits) of the recomputed sequence, read with torch hooks."""
    arch = discover(eager)
    acc = ModuleMap(eager, arch)
    attn = acc.get_attention(layer)
    _, projection = find_output_projection(attn)
    got: dict[str, torch.Tensor] = {}
    handles = [
        projection.register_forward_pre_hook(lambda m, args: got.__setitem__("z", args[0])),
        acc.get_layers()[layer].register_forward_hook(
            lambda m, a, out: got.__setitem__("out", out[0] if isinstance(out, tuple) else out)),
    ]
    if edit is not None:  # the same edit through the eager copy's own hook point, applied to every query row
        install_attention_hooks(eager, [acc.get_attention(i) if p.attention else None
                                        for i, p in enumerate(arch.layers)], always_materialize=True)
        handles.append(attn.unilens_hooks.probabilities.register_forward_hook(lambda m, a, p: edit(p)))
    per_step = []
    try:
        for k in range(steps):
            width = prompt_mask.shape[1] + k
            mask = torch.cat([prompt_mask, torch.ones(prompt_mask.shape[0], k, dtype=prompt_mask.dtype)], dim=1)
            out = hf_reference_forward(eager, {"input_ids": tokens[:, :width], "attention_mask": mask},
                                       output_attentions=edit is None, use_cache=False)
            probs = out.attentions[layer] if edit is None else None
            per_step.append((probs, got["z"], got["out"], out.logits[:, -1]))
    finally:
        for h in handles:
            h.remove()
    return per_step


def _close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """1e-5 of the tensor's scale (at least 1): an absolute 1e-5 is below one fp32 ulp for values >= 128, which a
    real model's residual stream reaches (SmolLM2's layer 20: |x| ~ 200, where one ulp is 1.5e-5)."""
    assert ours.shape == ref.shape, (what, tuple(ours.shape), tuple(ref.shape))
    err = (ours - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= TOL * scale, f"{what}: max error {err:.2e} (scale {scale:.3g})"


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_every_step_equals_the_no_cache_reference(model_type):
    model, eager, tok = _models(model_type)
    layer = model.architecture.attention_layers[-1]
    names = [f"layers_output.{layer}", f"attention_heads.{layer}", f"attention_probabilities.{layer}"]
    out = generate(model, PROMPTS, max_new_tokens=STEPS, capture=names, min_new_tokens=STEPS)
    for name in names:
        assert len(out.steps[name]) == STEPS, f"{name}: {len(out.steps[name])} of {STEPS} steps captured"
    prompt = tok(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hf_tokens = model.module_accessor.model.generate(**prompt, max_new_tokens=STEPS, min_new_tokens=STEPS,
                                                          do_sample=False)
    assert torch.equal(out.tokens, hf_tokens)
    mask = prompt["attention_mask"]
    reference = _reference(eager, out.tokens, mask, layer, STEPS)
    real = mask.bool()
    for k, (probs, z, layer_out, _) in enumerate(reference):
        ours_p = out.steps[f"attention_probabilities.{layer}"][k]
        ours_z = out.steps[f"attention_heads.{layer}"][k]
        ours_h = out.steps[f"layers_output.{layer}"][k]
        if k == 0:  # every real query row of the prompt, against real keys
            keys = real[:, None, None, :]
            for b in range(len(PROMPTS)):
                rows = real[b]
                _close((ours_p[b][:, rows] * keys[b]), (probs[b][:, rows] * keys[b]), f"step 0 probabilities[{b}]")
                _close(ours_z[b][rows].flatten(1), z[b][rows], f"step 0 heads[{b}]")
                _close(ours_h[b][rows], layer_out[b][rows], f"step 0 layers_output[{b}]")
        else:
            # a sliding-window layer's cache keeps only the window's keys: the probabilities cover those, and the
            # reference gives every key before them zero weight
            kept = ours_p.shape[-1]
            _close(ours_p, probs[:, :, -1:, -kept:], f"step {k} probabilities")
            assert probs[:, :, -1:, :-kept].abs().max() == 0 if kept < probs.shape[-1] else True
            _close(ours_z.flatten(2), z[:, -1:], f"step {k} heads")
            _close(ours_h, layer_out[:, -1:], f"step {k} layers_output")


def _halve(p: torch.Tensor) -> torch.Tensor:
    return p * 0.5


@pytest.mark.filterwarnings("ignore:.*was never reached")  # the open loop's request for a step past the last
@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_attention_edit_acts_on_every_step(model_type):
    """An edit of attention_probabilities in nnsight's open generation loop (tracer.all()) changes every step's
    logits exactly as the same edit in a recomputed (no-cache) forward does."""
    model, eager, tok = _models(model_type)
    layer = model.architecture.attention_layers[0]
    logits: list[torch.Tensor] = []  # built outside the trace: only saved values leave it
    result = {}
    with torch.no_grad(), model.generate(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False) as tracer:
        with tracer.invoke(PROMPTS):
            for _ in tracer.all():  # the open loop: every step the model makes
                model.attention_probabilities[layer] = _halve(model.attention_probabilities[layer])
                logits.append(model.logits[:, -1].save())
        with tracer.invoke():
            result["tokens"] = tracer.result.save()
    assert len(logits) == STEPS
    mask = tok(PROMPTS, padding=True, return_tensors="pt")["attention_mask"]
    plain = _reference(eager, result["tokens"], mask, layer, STEPS)
    edited = _reference(eager, result["tokens"], mask, layer, STEPS, edit=_halve)
    for k in range(STEPS):
        _close(logits[k], edited[k][3], f"step {k} edited logits")
        assert (logits[k] - plain[k][3]).abs().max() > 1e-4, f"step {k}: the edit changed nothing"


def test_steering_with_cache_equals_steering_recomputed():
    """Steering every generated token (and the prompt) with the KV cache gives the same tokens as steering the
    whole sequence recomputed at every step without a cache."""
    model, eager, tok = _models("llama")
    g = torch.Generator().manual_seed(0)
    vector = torch.randn(model.hidden_size, generator=g)
    for where in ("all", "prompt", "generated"):
        steer = Steering(layers=[0, 1], vector=vector, factor=3.0, where=where)
        out = generate(model, PROMPTS, max_new_tokens=STEPS, steer=steer, min_new_tokens=STEPS)
        plain = generate(model, PROMPTS, max_new_tokens=STEPS, min_new_tokens=STEPS)
        assert not torch.equal(out.new_tokens, plain.new_tokens), f"{where}: steering changed no token"
        # reference: greedy decoding, every step a full no-cache forward with the vector added by a torch hook
        prompt = tok(PROMPTS, padding=True, return_tensors="pt")
        tokens, mask = prompt["input_ids"], prompt["attention_mask"]
        prompt_len = tokens.shape[1]
        layers = ModuleMap(eager, discover(eager)).get_layers()

        def add(module, args, output, mask_now=None):
            hidden = output[0] if isinstance(output, tuple) else output
            positions = torch.arange(hidden.shape[1])
            steered = mask_now.clone().bool()
            if where == "prompt":
                steered &= (positions < prompt_len)[None]
            if where == "generated":
                # generated tokens fed back: positions prompt_len.. (the last prompt position is the prompt's)
                steered &= (positions >= prompt_len)[None]
            hidden = hidden + steered[..., None] * (3.0 * vector)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        for _ in range(STEPS):
            handles = [layers[i].register_forward_hook(lambda m, a, o: add(m, a, o, mask)) for i in (0, 1)]
            try:
                logits = hf_reference_forward(eager, {"input_ids": tokens, "attention_mask": mask},
                                              use_cache=False).logits[:, -1]
            finally:
                for h in handles:
                    h.remove()
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        assert torch.equal(out.tokens, tokens), f"{where}: cached and recomputed steering differ"


def test_generate_logit_lens_last_layer_is_the_model():
    model, _, tok = _models("llama")
    out = generate(model, PROMPTS, max_new_tokens=3, logit_lens=True, capture=["logits"], min_new_tokens=3)
    assert out.lens.shape == (2, 3, model.num_layers, model.vocab_size)
    for k in range(3):
        model_probs = out.steps["logits"][k][:, -1].softmax(-1)
        assert (out.lens[:, k, -1] - model_probs).abs().max() < 1e-5
        assert torch.equal(out.lens[:, k, -1].argmax(-1), out.new_tokens[:, k])


def test_attention_assignment_is_shape_and_dtype_checked():
    model, _, _ = _models("llama")
    with pytest.raises(ValueError, match=r"attention_probabilities\[0\].*shape"):
        with model.trace(PROMPTS):
            p = model.attention_probabilities[0]
            model.attention_probabilities[0] = p[0]  # batch dimension dropped: would broadcast row 0 to row 1
    with pytest.raises(TypeError, match="torch.float64.*Cast it first"):
        with model.trace(PROMPTS):
            model.attention_probabilities[0] = model.attention_probabilities[0].double()


def test_attention_accessor_outside_a_trace_is_refused_and_leaves_no_request():
    model, _, _ = _models("llama")
    with pytest.raises(ValueError, match="inside `with model.trace"):
        model.attention_probabilities[0]
    hooks = model._attention_modules[0].unilens_hooks
    assert not hooks.materialize and not hooks.active  # the next forward keeps the fast path


ALL_NAMES = ["layers_input", "attentions_input", "attention_queries", "attention_keys", "attention_values",
             "attention_scores", "attention_probabilities", "attention_heads", "attention_head_results",
             "attentions_output", "mlps_input", "mlps_output", "layers_output"]


def _last(name: str, ours: torch.Tensor, ref: torch.Tensor, real_keys: torch.Tensor):
    """(ours, reference) restricted to the newest position: the last query row, the keys the cache holds."""
    if name in ("attention_keys", "attention_values"):  # (batch, kv_heads, keys, head_dim): the whole cache
        kept = ours.shape[2]
        return ours, ref[:, :, -kept:]
    if name == "attention_queries":  # (batch, heads, 1, head_dim)
        return ours, ref[:, :, -1:]
    if name in ("attention_scores", "attention_probabilities"):  # (batch, heads, 1, keys): real keys only
        kept = ours.shape[-1]
        keys = real_keys[:, None, None, -kept:]
        ref = ref[:, :, -1:, -kept:]
        return torch.where(keys, ours, 0.0), torch.where(keys, ref, 0.0)
    return ours, ref[:, -1:]  # token-major (batch, 1, ...)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma2", "qwen2_moe", "gpt_oss", "phi", "opt", "falcon"])
def test_every_accessor_on_every_step_equals_a_recomputed_read(model_type):
    """Every standardized tensor captured at every generation step equals the same read on the whole sequence
    recomputed without a cache (unilens's plain trace, itself checked against HF in the other tests)."""
    model, _, tok = _models(model_type)
    layer = model.architecture.attention_layers[-1]
    names = [f"{n}.{layer}" for n in ALL_NAMES]
    names += ["logits"]
    if model._attention_modules[layer].unilens_hooks.route == "softmax":  # inline attention: no q / k / v points
        names = [n for n in names if n.split(".")[0] not in ("attention_queries", "attention_keys",
                                                             "attention_values")]
    out = generate(model, PROMPTS, max_new_tokens=STEPS, capture=names, min_new_tokens=STEPS)
    prompt_mask = tok(PROMPTS, padding=True, return_tensors="pt")["attention_mask"]
    for k in range(1, STEPS):
        width = prompt_mask.shape[1] + k
        mask = torch.cat([prompt_mask, torch.ones(2, k, dtype=prompt_mask.dtype)], dim=1)
        ref = model.read({"input_ids": out.tokens[:, :width], "attention_mask": mask}, names)
        for name in names:
            ours, theirs = _last(name.split(".")[0], out.steps[name][k], ref[name], mask.bool())
            if name.startswith("attention_scores"):  # masked keys hold the dtype's minimum: compare the rest
                ours, theirs = ours.clamp(min=-1e4), theirs.clamp(min=-1e4)
            _close(ours, theirs, f"{model_type} step {k} {name}")


# ------------------------------------------------------------------------------------------------------------
# Right-padded batches (issue 27): generate re-pads them on the left; each row = its prompt alone
# ------------------------------------------------------------------------------------------------------------

RAGGED = ["The capital of France is", "Hi"]  # "Hi": the row a right-padded batch continued after its padding


def _right_padded(model_type: str) -> StandardizedTransformer:
    hf, tok = tiny_model(model_type)
    return StandardizedTransformer(hf, tokenizer=tok, check=False, tokenizer_kwargs={"padding_side": "right"})


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_generate_right_padded_batch_equals_each_prompt_alone(model_type):
    model = _right_padded(model_type)
    assert model.tokenizer.padding_side == "right"
    steer = Steering(layers=1, vector=torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0)),
                     factor=2.0)
    for kwargs in ({}, {"steer": steer}):
        out = generate(model, RAGGED, max_new_tokens=STEPS, min_new_tokens=STEPS, logit_lens=True,
                       capture=["layers_output.1"], **kwargs)
        assert model.tokenizer.padding_side == "right"  # the user's setting comes back
        for b, prompt in enumerate(RAGGED):
            alone = generate(model, prompt, max_new_tokens=STEPS, min_new_tokens=STEPS, logit_lens=True,
                             capture=["layers_output.1"], **kwargs)
            assert out.new_tokens[b].tolist() == alone.new_tokens[0].tolist(), (model_type, kwargs, prompt)
            _close(out.lens[b], alone.lens[0], f"lens of row {b}")
            for k in range(1, STEPS):  # each generated token's step
                _close(out.steps["layers_output.1"][k][b], alone.steps["layers_output.1"][k][0], f"step {k} row {b}")
        # the prompts are left-padded in what comes back: each row's prompt ends where its new tokens start
        prompt_len = out.tokens.shape[1] - STEPS
        assert out.tokens[1, :prompt_len].tolist()[-2:] == model.tokenizer("Hi").input_ids


def test_generate_left_padded_tokenizer_unchanged():
    """The re-padding is a no-op for a left-padding tokenizer: same tokens as HF's generate on the same batch."""
    model, _, tok = _models("llama")
    assert tok.padding_side == "left"
    out = generate(model, RAGGED, max_new_tokens=3, min_new_tokens=3)
    prompt = tok(RAGGED, padding=True, return_tensors="pt")
    with torch.no_grad():
        hf_tokens = model.module_accessor.model.generate(**prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert torch.equal(out.tokens, hf_tokens)


def test_generate_refuses_nonfinite_steering_unless_allowed():
    model, _, _ = _models("llama")
    vector = torch.zeros(model.hidden_size)
    vector[7] = float("nan")
    with pytest.raises(NonFiniteSteeringError, match=r"steer\[0\] \(layers 1\).*the first nan at index 7"):
        generate(model, RAGGED, max_new_tokens=2, steer=Steering(layers=1, vector=vector))
    with pytest.raises(NonFiniteSteeringError, match="factor is inf"):
        generate(model, RAGGED, max_new_tokens=2, steer=Steering(layers=1, vector=torch.ones(model.hidden_size),
                                                                factor=float("inf")))
    out = generate(model, "Hi", max_new_tokens=1, steer=Steering(layers=1, vector=vector, allow_nonfinite=True),
                   capture=["layers_output.1"])
    assert torch.isnan(out.steps["layers_output.1"][0]).any()  # added on purpose: it is there
    fine = generate(model, "Hi", max_new_tokens=1, steer=Steering(layers=1, vector=torch.ones(model.hidden_size)))
    assert fine.new_tokens.shape == (1, 1)
