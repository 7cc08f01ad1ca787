"""unilens.hook_points on every required architecture and SmolLM2: each point against an oracle that does not use
unilens's own plan (plain torch hooks on the HF modules, named as in the HF modeling code, or a hand computation from
HF weights), edits against an independent route, and refusals with their reasons."""

from __future__ import annotations

import warnings

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.hooks.points import LAYER_POINTS, UnsupportedHookPoint
from unilens.testing import ZOO_REQUIRED, tiny_model

TEXT = ["The capital of France is Paris"]

# --- the oracle's own knowledge of the HF modeling code (module names), independent of unilens's data-flow probe ---
INPUT_NORM = ("input_layernorm", "ln_1", "self_attn_layer_norm", "norm_attn_norm.norm_1")
MLP_NORM = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "final_layer_norm",
            "norm_attn_norm.norm_2")
GATE = ("gate_proj", "c_fc", "fc_in", "dense_h_to_4h", "fc1")
DOWN = ("down_proj", "c_proj", "fc_out", "dense_4h_to_h", "fc2")
PARALLEL_ONE_NORM = {"gptj", "phi", "falcon", "cohere"}  # attention and MLP read ln_1 / input_layernorm
PARALLEL = PARALLEL_ONE_NORM | {"gpt_neox"}
NO_PRE_NORM = {"olmo2"}  # norms after the branches, none before
MOE_ALL_LAYERS = {"mixtral", "qwen2_moe", "qwen3_moe", "dbrx", "gpt_oss"}
MOE_FROM_CONFIG = {"deepseek_v3", "glm4_moe"}  # dense MLP below config.first_k_dense_replace
MLA = {"deepseek_v3"}
POST_BRANCH_NORM = {"gemma2": "post_attention_layernorm", "gemma3_text": "post_attention_layernorm",
                    "olmo2": "post_attention_layernorm"}  # normalizes the attention output before the residual add
ATTENTION_ADDS_RESIDUAL = {"bloom"}  # BloomAttention returns dropout_add(dense(z), residual)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


_MODELS: dict[str, StandardizedTransformer] = {}


def _model(model_type: str) -> StandardizedTransformer:
    if model_type not in _MODELS:
        _MODELS.clear()  # one model alive at a time
        hf, tok = _quiet(tiny_model, model_type)
        _MODELS[model_type] = _quiet(StandardizedTransformer, hf, tokenizer=tok)
    return _MODELS[model_type]


def _batch(model):
    """Two rows of the same length, no padding (a plain HF call and a trace place padded positions differently on
    absolute-position models, which is not what these tests are about)."""
    ids = model.tokenizer(TEXT[0], return_tensors="pt")["input_ids"]
    ids = torch.cat([ids, ids.flip(-1)])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _child(layer, names):
    for name in names:
        try:
            return layer.get_submodule(name)
        except AttributeError:
            continue
    return None


def _gated(model_type, mlp) -> bool:
    return mlp is not None and (hasattr(mlp, "up_proj") or hasattr(mlp, "gate_up_proj"))


def _is_moe(model_type, layer: int, hf) -> bool:
    if model_type in MOE_ALL_LAYERS:
        return True
    if model_type in MOE_FROM_CONFIG:
        return layer >= hf.config.first_k_dense_replace
    return False


def _norm_oracle(norm, x):
    """TL's definitions by hand: scale (batch, seq, 1), normalized (before weight / bias) and the norm's output."""
    center = "RMS" not in type(norm).__name__
    eps = next((getattr(norm, k) for k in ("eps", "variance_epsilon") if isinstance(getattr(norm, k, None), float)),
               1e-5)
    xc = x - x.mean(-1, keepdim=True) if center else x
    scale = (xc.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    normalized = xc / scale
    w = getattr(norm, "weight", None)
    offset = 1.0 if type(norm).__name__.startswith("Gemma") else 0.0  # Gemma's RMSNorm: x * (1 + w)
    out = normalized * (w + offset) if isinstance(w, torch.Tensor) else normalized
    b = getattr(norm, "bias", None)
    return scale, normalized, out + b if isinstance(b, torch.Tensor) else out


def _record_hf(model, batch):
    """A plain HF forward (no unilens point requested) with torch hooks on the HF modules, by their HF names."""
    hf = model.module_accessor.model
    arch = model.architecture
    rec: dict = {}
    handles = []

    def keep(key, what):
        def hook(mod, args, kwargs, out):
            x = args[0] if args else kwargs.get("hidden_states")
            rec[key] = (x.detach().clone(), (out[0] if isinstance(out, tuple) else out).detach().clone())[what]
        return hook

    for i in range(model.num_layers):
        layer = model.module_accessor.get_layer(i)
        attn = model._attention_modules[i]
        for key, names in (("input_norm", INPUT_NORM), ("mlp_norm", MLP_NORM)):
            norm = _child(layer, names)
            if norm is not None:
                handles.append(norm.register_forward_hook(keep((key, "in", i), 0), with_kwargs=True))
                handles.append(norm.register_forward_hook(keep((key, "out", i), 1), with_kwargs=True))
        handles.append(layer.register_forward_hook(keep(("layer_in", i), 0), with_kwargs=True))
        handles.append(layer.register_forward_hook(keep(("layer_out", i), 1), with_kwargs=True))
        if attn is not None:
            handles.append(attn.register_forward_hook(keep(("attn_in", i), 0), with_kwargs=True))
            handles.append(attn.register_forward_hook(keep(("attn_out", i), 1), with_kwargs=True))
            for part in ("q_proj", "k_proj"):
                proj = getattr(attn, part, None)
                if proj is not None:
                    handles.append(proj.register_forward_hook(keep((part, i), 1), with_kwargs=True))
        post = POST_BRANCH_NORM.get(arch.model_type)
        if post is not None:
            handles.append(layer.get_submodule(post).register_forward_hook(keep(("post_branch", i), 1),
                                                                           with_kwargs=True))
        mlp = model.module_accessor.get_mlp(i) if arch.layers[i].mlp else layer
        for key, names in (("gate", GATE + ("gate_up_proj",)), ("up", ("up_proj",))):
            proj = _child(mlp, names)
            if proj is not None:
                handles.append(proj.register_forward_hook(keep((key, i), 1), with_kwargs=True))
        down = _child(mlp, DOWN)
        if down is not None:
            handles.append(down.register_forward_hook(keep(("down_in", i), 0), with_kwargs=True))
    final = hf.get_submodule(arch.final_norm_path)
    handles.append(final.register_forward_hook(keep(("final_in",), 0), with_kwargs=True))
    try:
        with torch.no_grad():
            rec["logits"] = hf(**batch).logits
    finally:
        for h in handles:
            h.remove()
    return rec


def _close(a, b, what, atol=1e-5):
    a, b = a.float(), b.float()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != oracle {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= atol * max(1.0, b.abs().max().item()), f"{what}: max error {err:.3g}"


def _expected_refusals(model, model_type, i) -> dict[str, str]:
    """point -> a word the reason must contain, from the HF code's structure (the oracle's own table)."""
    hf = model.module_accessor.model
    out: dict[str, str] = {}
    if model_type in PARALLEL:
        out["layers_resid_mid"] = "parallel"
    if model_type in PARALLEL_ONE_NORM:
        out["post_attention_norms_scale"] = out["post_attention_norms_normalized"] = "parallel"
    if model_type in NO_PRE_NORM:
        for p in ("input_norms_scale", "input_norms_normalized", "post_attention_norms_scale",
                  "post_attention_norms_normalized"):
            out[p] = "no norm"
    if model_type in MLA:
        for p in ("attention_inputs_per_head", "attention_queries_input", "attention_keys_input",
                  "attention_values_input", "attention_queries_pre_rotary", "attention_keys_pre_rotary"):
            out[p] = "latent"
    if _is_moe(model_type, i, hf):
        for p in ("mlps_pre_activation", "mlps_pre_linear", "mlps_post_activation"):
            out[p] = "mixture-of-experts"
    else:
        mlp = model.module_accessor.get_mlp(i) if model.architecture.layers[i].mlp else None
        if not _gated(model_type, mlp):
            out["mlps_pre_linear"] = "not gated"
    return out


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_reads_match_oracles(model_type):
    model = _model(model_type)
    hf = model.module_accessor.model
    batch = _batch(model)
    rec = _record_hf(model, batch)
    n = model.num_layers
    refused = {i: _expected_refusals(model, model_type, i) for i in range(n)}
    names = [f"{p}.{i}" for i in range(n) for p in LAYER_POINTS if p not in refused[i]]
    names += ["final_norm_scale", "final_norm_normalized", "logits"]
    got = model.read(dict(batch), list(reversed(names)))  # any order: model.read sorts by the forward
    _close(got["logits"], rec["logits"], "logits untouched")
    for i in range(n):
        for point, word in refused[i].items():
            with pytest.raises(UnsupportedHookPoint, match=word):
                with model.trace(dict(batch)):
                    getattr(model, point)[i].save()
        layer = model.module_accessor.get_layer(i)
        # norms
        for key, prefix in (("input_norm", "input_norms"), ("mlp_norm", "post_attention_norms")):
            if f"{prefix}_scale.{i}" not in got:
                continue
            norm = _child(layer, INPUT_NORM if key == "input_norm" else MLP_NORM)
            scale, normalized, out = _norm_oracle(norm, rec[(key, "in", i)])
            _close(got[f"{prefix}_scale.{i}"], scale, f"{prefix}_scale[{i}]")
            _close(got[f"{prefix}_normalized.{i}"], normalized, f"{prefix}_normalized[{i}]", atol=1e-4)
            _close(out, rec[(key, "out", i)], f"oracle {prefix}[{i}]: normalized * w + b is the norm's output",
                   atol=1e-4)
        # attention inputs per head: the residual before the input norm (TL's bridge forks it there) copied per
        # (kv) head; the attention's input where the layer has no input norm (OLMo 2)
        if f"attention_inputs_per_head.{i}" in got:
            x = rec[("attn_in", i)]  # (batch, seq, hidden)
            resid = rec.get(("input_norm", "in", i), x)
            w = model.weights[i]
            heads, kv = w.W_Q.shape[0], w.W_K.shape[0]
            _close(got[f"attention_inputs_per_head.{i}"], resid[:, :, None].expand(-1, -1, heads, -1), "attn_in")
            _close(got[f"attention_queries_input.{i}"], resid[:, :, None].expand(-1, -1, heads, -1), "q_input")
            _close(got[f"attention_keys_input.{i}"], resid[:, :, None].expand(-1, -1, kv, -1), "k_input")
            _close(got[f"attention_values_input.{i}"], resid[:, :, None].expand(-1, -1, kv, -1), "v_input")
            for part, W, b in (("q_proj", w.W_Q, w.b_Q), ("k_proj", w.W_K, w.b_K)):
                key = "attention_queries_pre_rotary" if part == "q_proj" else "attention_keys_pre_rotary"
                if (part, i) in rec:  # separate projection: its output, split into heads
                    out = rec[(part, i)]
                    expected = out.unflatten(-1, (W.shape[0], W.shape[-1])).transpose(1, 2)
                else:  # fused projection: x @ W + b per head from the weight views (checked against TL elsewhere)
                    expected = (torch.einsum("bsm,hmd->bhsd", x, W) + b[None, :, None]).detach()
                _close(got[f"{key}.{i}"], expected, f"{key}[{i}]", atol=1e-4)
        # MLP neurons
        if f"mlps_pre_activation.{i}" in got:
            gate = rec[("gate", i)]
            b, s = batch["input_ids"].shape
            gate = gate.reshape(b, s, -1)
            if model_type == "phi3":  # fused gate_up_proj: gate, up = chunk(2) (HF Phi3MLP)
                gate, up = gate.chunk(2, dim=-1)
                _close(got[f"mlps_pre_linear.{i}"], up, f"mlps_pre_linear[{i}]")
            elif ("up", i) in rec:
                _close(got[f"mlps_pre_linear.{i}"], rec[("up", i)], f"mlps_pre_linear[{i}]")
            _close(got[f"mlps_pre_activation.{i}"], gate, f"mlps_pre_activation[{i}]")
            _close(got[f"mlps_post_activation.{i}"], rec[("down_in", i)].reshape(b, s, -1),
                   f"mlps_post_activation[{i}]")
        # resid_mid: layer input + the attention branch (hand computation from the HF modules' outputs)
        if f"layers_resid_mid.{i}" in got:
            if model_type in ATTENTION_ADDS_RESIDUAL:
                expected = rec[("attn_out", i)]
            else:
                branch = rec.get(("post_branch", i), rec[("attn_out", i)])
                multiplier = getattr(hf.config, "residual_multiplier", 1.0)
                expected = rec[("layer_in", i)] + multiplier * branch
            _close(got[f"layers_resid_mid.{i}"], expected, f"layers_resid_mid[{i}]")
    if model_type == "gpt2":  # no rotary, no q/k norm, no q scaling: pre-rotary q / k are the attention's q / k
        post = model.read(batch, ["attention_queries.1", "attention_keys.1"])
        _close(got["attention_queries_pre_rotary.1"], post["attention_queries.1"], "gpt2 q == attention_queries")
        _close(got["attention_keys_pre_rotary.1"], post["attention_keys.1"], "gpt2 k == attention_keys")
    final = hf.get_submodule(model.architecture.final_norm_path)
    scale, normalized, _ = _norm_oracle(final, rec[("final_in",)])
    _close(got["final_norm_scale"], scale, "final_norm_scale")
    _close(got["final_norm_normalized"], normalized, "final_norm_normalized", atol=1e-4)


def _attention_branch_end(model, model_type, i):
    """The HF module whose output is the attention branch as added to the residual (oracle's table)."""
    layer = model.module_accessor.get_layer(i)
    post = POST_BRANCH_NORM.get(model_type)
    return layer.get_submodule(post) if post else model._attention_modules[i]


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_edits_match_independent_routes(model_type):
    model = _model(model_type)
    hf = model.module_accessor.model
    batch = dict(_batch(model))
    refused = _expected_refusals(model, model_type, 0)
    ids = batch["input_ids"]
    b, s = ids.shape

    # 1. replacing a norm's normalized by an equal copy recomputes normalized * w + b: logits unchanged (HF oracle)
    reference = _record_hf(model, batch)["logits"]
    points = [p for p in ("input_norms_normalized", "post_attention_norms_normalized") if p not in refused]
    with torch.no_grad(), model.trace(batch):
        for p in points:
            getattr(model, p)[0] = getattr(model, p)[0].clone() * 1.0
        model.final_norm_normalized = model.final_norm_normalized.clone() * 1.0
        logits = model.logits.save()
    _close(logits, reference, f"logits after re-set {points} + final_norm_normalized", atol=1e-4)

    # 2. scaling a norm's normalized: the attention then reads (2 * normalized) * w + b (hand computation)
    if "input_norms_normalized" not in refused:
        norm = _child(model.module_accessor.get_layer(0), INPUT_NORM)
        with torch.no_grad(), model.trace(batch):
            normalized = model.input_norms_normalized[0].save()
            model.input_norms_normalized[0] = normalized * 2.0
            attn_in = model.attentions_input[0].save()
        w = getattr(norm, "weight", None)
        offset = 1.0 if type(norm).__name__.startswith("Gemma") else 0.0
        expected = 2.0 * normalized * (w + offset) if w is not None else 2.0 * normalized
        if getattr(norm, "bias", None) is not None:
            expected = expected + norm.bias
        _close(attn_in, expected, "attention input after scaling input_norms_normalized", atol=1e-4)

    # 3. resid_mid + delta == the attention branch + delta (a torch hook on the HF module, independent route)
    if "layers_resid_mid" not in refused:
        delta = torch.randn(model.hidden_size) * 0.5
        with torch.no_grad(), model.trace(batch):
            model.layers_resid_mid[0] = model.layers_resid_mid[0] + delta
            logits = model.logits.save()
        multiplier = 1.0 if model_type in ATTENTION_ADDS_RESIDUAL else getattr(hf.config, "residual_multiplier", 1.0)

        def add(mod, args, out):
            return (out[0] + delta / multiplier, *out[1:]) if isinstance(out, tuple) else out + delta / multiplier

        handle = _attention_branch_end(model, model_type, 0).register_forward_hook(add)
        try:
            with torch.no_grad():
                expected = hf(**batch).logits
        finally:
            handle.remove()
        _close(logits, expected, "logits after layers_resid_mid += delta", atol=1e-4)

    # 4. MLP: zero pre-activation -> zero post-activation (act(0) = 0 for every activation here); zero
    #    post-activation -> MLP output is the down projection's bias
    if "mlps_pre_activation" not in refused:
        with torch.no_grad(), model.trace(batch):
            model.mlps_pre_activation[0] = torch.zeros_like(model.mlps_pre_activation[0])
            post = model.mlps_post_activation[0].save()
        assert float(post.abs().max()) == 0.0
        down = _child(model.module_accessor.get_mlp(0) if model.architecture.layers[0].mlp
                      else model.module_accessor.get_layer(0), DOWN)
        with torch.no_grad(), model.trace(batch):
            model.mlps_post_activation[0] = torch.zeros_like(model.mlps_post_activation[0])
            out = model.mlps_output[0].save()  # Bloom: the down projection's output (its MLP adds the residual)
        bias = down.bias if getattr(down, "bias", None) is not None else torch.zeros(model.hidden_size)
        _close(out, bias.expand(b, s, -1), "mlps_output after zeroing mlps_post_activation")

    # 5. one head's query input shifted by a position: only that head's pre-rotary query changes, to
    #    norm(r shifted) @ W_Q[h] + b_Q[h] (r: the residual the input norm reads; norm by hand from the HF weights)
    if "attention_queries_input" not in refused:
        w = model.weights[0]
        h = w.W_Q.shape[0] - 1
        with torch.no_grad(), model.trace(batch):
            q_in = model.attention_queries_input[0]
            edited = q_in.clone()
            edited[:, :, h] = q_in[:, :, h].roll(1, dims=1)
            model.attention_queries_input[0] = edited
            k_edit = model.attention_keys_input[0].clone()
            k_edit[:, :, 0] = 0.0
            model.attention_keys_input[0] = k_edit
            q = model.attention_queries_pre_rotary[0].save()
            k = model.attention_keys_pre_rotary[0].save()
        rec = _record_hf(model, batch)
        x = rec[("attn_in", 0)]
        norm = _child(model.module_accessor.get_layer(0), INPUT_NORM)

        def normed(r):  # what the attention reads from residual copy r
            return r if norm is None else _norm_oracle(norm, r)[2]

        resid = rec.get(("input_norm", "in", 0), x)
        plain_q = (torch.einsum("bsm,hmd->bhsd", x, w.W_Q) + w.b_Q[None, :, None]).detach()
        plain_k = (torch.einsum("bsm,hmd->bhsd", x, w.W_K) + w.b_K[None, :, None]).detach()
        expected_q = plain_q.clone()
        expected_q[:, h] = (torch.einsum("bsm,md->bsd", normed(resid.roll(1, dims=1)), w.W_Q[h]) + w.b_Q[h]).detach()
        assert (expected_q[:, h] - plain_q[:, h]).abs().max() > 1e-3  # the edit is visible
        expected_k = plain_k.clone()
        expected_k[:, 0] = (normed(torch.zeros_like(resid)) @ w.W_K[0] + w.b_K[0]).detach()
        _close(q, expected_q, "pre-rotary queries after editing one head's query input", atol=1e-4)
        _close(k, expected_k, "pre-rotary keys after zeroing kv head 0's key input", atol=1e-4)
        # values: zeroing the last kv head's value input leaves its bias in attention_values (interface route)
        if model._attention_modules[0].unilens_hooks.route == "interface":
            last = w.W_V.shape[0] - 1
            with torch.no_grad(), model.trace(batch):
                v_edit = model.attention_values_input[0].clone()
                v_edit[:, :, last] = 0.0
                model.attention_values_input[0] = v_edit
                v = model.attention_values[0].save()  # (batch, kv_heads, seq, head_dim)
            expected_v = (torch.einsum("bsm,hmd->bhsd", x, w.W_V) + w.b_V[None, :, None]).detach()
            expected_v[:, last] = (normed(torch.zeros_like(resid)) @ w.W_V[last] + w.b_V[last]).detach()
            _close(v, expected_v, "values after zeroing the last kv head's value input", atol=1e-4)


def test_unrequested_points_add_no_hooks_and_refusals_are_uniform():
    model = _model("llama")
    hf = model.module_accessor.model

    def count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in hf.modules())

    before = count()
    with torch.no_grad(), model.trace("The cat sat"):
        model.layers_output[0].save()
    assert count() == before  # an ordinary trace registers nothing
    with torch.no_grad(), model.trace("The cat sat"):
        model.layers_resid_mid[1].save()
        model.mlps_pre_activation[1].save()
    assert count() == before  # the points' hooks end with their trace
    with pytest.raises(ValueError, match="inside"):
        model.mlps_pre_activation[0]
    gptj = _quiet(StandardizedTransformer, *_quiet(tiny_model, "gptj"))
    with pytest.raises(UnsupportedHookPoint, match=r"layers_resid_mid\[0\] is not available on this gptj model: "
                                                   "parallel block"):
        gptj.read("The cat", ["layers_resid_mid.0"])
    with pytest.raises(UnsupportedHookPoint, match="parallel block"):
        gptj.read("The cat", ["layers_resid_mid.*"])


def test_smollm2_points_match_oracles():
    from unilens import load_default

    model = _quiet(load_default)
    hf = model.module_accessor.model
    batch = dict(model.tokenizer(["The capital of France is"], return_tensors="pt"))
    rec = {}
    layer = model.module_accessor.get_layer(7)
    handles = [
        layer.input_layernorm.register_forward_hook(lambda m, a, o: rec.__setitem__("ln1_in", a[0])),
        layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: rec.__setitem__("q", o)),
        layer.mlp.gate_proj.register_forward_hook(lambda m, a, o: rec.__setitem__("gate", o)),
        layer.mlp.up_proj.register_forward_hook(lambda m, a, o: rec.__setitem__("up", o)),
        layer.mlp.down_proj.register_forward_hook(lambda m, a, o: rec.__setitem__("down_in", a[0])),
        layer.register_forward_hook(lambda m, a, o: rec.__setitem__("layer_in", a[0])),
        layer.self_attn.register_forward_hook(lambda m, a, o: rec.__setitem__("attn_out", o[0])),
    ]
    try:
        with torch.no_grad():
            logits = hf(**batch).logits
    finally:
        for h in handles:
            h.remove()
    got = model.read(batch, ["mlps_post_activation.7", "layers_resid_mid.7", "mlps_pre_linear.7",
                             "mlps_pre_activation.7", "attention_queries_pre_rotary.7", "input_norms_normalized.7",
                             "input_norms_scale.7", "logits"])
    _close(got["logits"], logits, "logits")
    scale, normalized, _ = _norm_oracle(layer.input_layernorm, rec["ln1_in"])
    _close(got["input_norms_scale.7"], scale, "scale")
    _close(got["input_norms_normalized.7"], normalized, "normalized", atol=1e-4)
    q = rec["q"].unflatten(-1, (model.num_heads, model.head_dim)).transpose(1, 2)
    _close(got["attention_queries_pre_rotary.7"], q, "hook_q")
    _close(got["mlps_pre_activation.7"], rec["gate"], "hook_pre")
    _close(got["mlps_pre_linear.7"], rec["up"], "hook_pre_linear")
    _close(got["mlps_post_activation.7"], rec["down_in"], "hook_post")
    _close(got["layers_resid_mid.7"], rec["layer_in"] + rec["attn_out"], "resid_mid")
    # an edit: resid_mid + delta at layer 7 == attention output + delta (plain torch hook route)
    delta = torch.randn(model.hidden_size) * 0.1
    with torch.no_grad(), model.trace(batch):
        model.layers_resid_mid[7] = model.layers_resid_mid[7] + delta
        edited = model.logits.save()
    handle = layer.self_attn.register_forward_hook(lambda m, a, o: (o[0] + delta, *o[1:]))
    try:
        with torch.no_grad():
            expected = hf(**batch).logits
    finally:
        handle.remove()
    _close(edited, expected, "logits after resid_mid edit", atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*was never reached")  # the open loop's request for a step past the last
def test_points_in_every_generation_step():
    """In nnsight's open generation loop a point is served at every step; each equals the HF module's output in a
    plain HF generate (torch hook on gate_proj, same greedy tokens)."""
    model = _model("llama")
    hf = model.module_accessor.model
    ids = _batch(model)["input_ids"][:1]
    steps = 3
    saved: list[torch.Tensor] = []  # built outside the trace: only saved values leave it
    with torch.no_grad(), model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False) as tracer:
        for _ in tracer.all():
            saved.append(model.mlps_pre_activation[1].save())
    recorded: list[torch.Tensor] = []
    handle = hf.model.layers[1].mlp.gate_proj.register_forward_hook(lambda m, a, o: recorded.append(o.clone()))
    try:
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                        do_sample=False)
    finally:
        handle.remove()
    assert len(saved) == steps
    for k in range(steps):
        _close(saved[k], recorded[k], f"mlps_pre_activation[1] at generation step {k}")


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gpt2", "opt"])
def test_bfloat16_model_has_the_same_points(model_type):
    """The probe's data-flow tests allow for bfloat16 rounding: a bfloat16 model offers the points its float32 twin
    does, and its resid_mid is the layer input + attention output (hand computation, bfloat16 tolerance)."""
    hf, tok = _quiet(tiny_model, model_type)
    half = _quiet(StandardizedTransformer, hf.to(torch.bfloat16), tokenizer=tok)
    full = _model(model_type)
    for i in range(full.num_layers):
        for point in LAYER_POINTS:
            assert (half._hook_point_setup.reason(point, i) is None) == (full._hook_point_setup.reason(point, i)
                                                                         is None), (point, i)
    batch = _batch(half)
    rec = _record_hf(half, batch)
    got = half.read(batch, ["layers_resid_mid.1", "input_norms_scale.1"])
    branch = rec.get(("post_branch", 1), rec[("attn_out", 1)])
    _close(got["layers_resid_mid.1"], rec[("layer_in", 1)] + branch, "bfloat16 resid_mid", atol=1e-2)
    assert got["input_norms_scale.1"].dtype == torch.float32  # TL's bridge upcasts half-precision statistics


def _readable_names(model) -> list[str]:
    """Every standardized name (all layers, whole-model names) this model serves, each checked by a one-name read:
    the ones a model refuses (``UnsupportedHookPoint``, or an attention class that computes q/k/v inline, both
    NotImplementedError) are left out, anything else that fails fails the test."""
    from unilens.hooks.reads import LAYER_ACCESSORS, MODEL_ACCESSORS, parse_names

    names = []
    for accessor in LAYER_ACCESSORS:
        try:
            names += [f"{accessor}.{i}" for _, i in parse_names(model, f"{accessor}.*")]
        except UnsupportedHookPoint:  # refused on every layer
            pass
    for accessor in MODEL_ACCESSORS:
        try:
            parse_names(model, accessor)
            names.append(accessor)
        except UnsupportedHookPoint:
            pass
    return names


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_every_name_in_one_read_matches_one_name_reads(model_type):
    """All the names a model serves, read in ONE forward (``model.read`` orders them by the recorded forward order,
    ``unilens.order.forward_order``), equal the values of one-name reads, where order cannot matter. Catches a
    recorded order that differs from the order nnsight serves values in (OLMo 2: resid_mid is served from a pre-hook
    of the MLP, before nnsight sees the MLP's input) and a point whose hook is registered after its module started
    (OPT: mlps_input is fc1's input, mlps_pre_activation fc1's output)."""
    model = _model(model_type)
    text = "The cat"
    alone: dict[str, torch.Tensor] = {}
    for name in _readable_names(model):
        try:
            alone[name] = model.read(text, [name])[name]
        except NotImplementedError:  # e.g. Bloom / Falcon compute q/k/v inline: no attention_queries
            continue
    assert {"layers_output.0", "logits"} <= set(alone) and len(alone) >= 40, sorted(alone)
    # where the attention adds the residual itself (Bloom), attentions_output and attention_head_results cannot share
    # a trace (documented refusal): read them in two full reads, each with every other name
    groups = [list(alone)]
    if model_type in ATTENTION_ADDS_RESIDUAL:
        with pytest.raises(ValueError, match="cannot be read in one trace"):
            model.read(text, ["attentions_output.0", "attention_head_results.0"])
        groups = [[n for n in alone if not n.startswith(drop)]
                  for drop in ("attention_head_results.", "attentions_output.")]
    for group in groups:
        together = model.read(text, group[::-1])  # any order: model.read reorders
        assert list(together) == group[::-1]
        for name in group:
            _close(together[name], alone[name], f"{model_type} {name} in one read of {len(group)} names")
