"""Mixture-of-experts routing as standardized tensors (unilens.hooks.routing, unilens.analysis.moe), checked against
the model's own code: HF's ``output_router_logits`` in the same forward, the family's gate edited by hand (an expert
removed from the model, or its gate bias set to the lowest value), the experts module called by hand, the family's
routing formula, and direct logit attribution of the whole MLP."""

from __future__ import annotations

import copy

import pytest
import torch
from nnsight import save

from unilens import StandardizedTransformer
from unilens.analysis import direct_logit_attribution
from unilens.analysis.moe import (
    ablate_experts,
    expert_logit_attribution,
    force_routing,
    moe_layers,
    routing_statistics,
)
from unilens.conformance.routing import routing_check
from unilens.hooks.points import UnsupportedHookPoint
from unilens.hooks.routing import UnsupportedRouting
from unilens.testing import tiny_model

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss")
TEXTS = ["The cat sat on the mat", "Hello there"]


@pytest.fixture(scope="module")
def loaded():
    """Per family: (the tiny HF model before unilens loaded it (a copy), the standardized model, the batch)."""
    out = {}
    for family in FAMILIES:
        hf, tok = tiny_model(family)
        plain = copy.deepcopy(hf)
        model = StandardizedTransformer(hf, tokenizer=tok)
        enc = tok(TEXTS, return_tensors="pt", padding=True)
        out[family] = (plain, model, {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask})
    return out


def _layer(model) -> int:
    return moe_layers(model)[0]


def _logits(model, batch, edit=None) -> torch.Tensor:
    with torch.no_grad(), model.trace(batch):
        if edit is not None:
            edit(model)
        logits = model.logits.save()
    return logits


def _drop_expert(hf, block_path: str, n_experts: int, expert: int) -> None:
    """The hand edit: remove ``expert`` from the block's router and experts (every parameter / buffer with one row
    per expert loses that row; every ``num_experts``-like attribute drops by one). The shared expert is kept."""
    keep = [e for e in range(n_experts) if e != expert]
    for module in hf.get_submodule(block_path).modules():
        if "shared" in type(module).__name__.lower():
            continue
        for name, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if value.dim() >= 1 and value.shape[0] == n_experts:
                rows = value.data[keep].clone()
                setattr(module, name, torch.nn.Parameter(rows, requires_grad=False)
                        if isinstance(value, torch.nn.Parameter) else rows)
        for key, value in list(vars(module).items()):
            if type(value) is int and value == n_experts and not key.startswith("_"):
                setattr(module, key, n_experts - 1)


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2_moe", "olmoe", "dbrx", "jetmoe", "granitemoe"])
def test_router_logits_are_hf_router_logits(family):
    """router_logits of every MoE layer equal what HF returns with output_router_logits=True, bitwise, same forward."""
    model = StandardizedTransformer(*tiny_model(family), check=False)
    assert routing_check(model) == f"match ({len(moe_layers(model))} MoE layers)"


@pytest.mark.parametrize("family", FAMILIES)
def test_ablation_equals_expert_removed_from_the_model(loaded, family):
    """Ablating expert 1 by unilens == the plain HF model with expert 1 removed from the gate and the experts by hand
    (loaded through unilens without edits, so both forwards run the same attention code)."""
    plain, model, batch = loaded[family]
    layer = _layer(model)
    plan = model._routing_setup.plan(layer)
    edited = copy.deepcopy(plain)
    _drop_expert(edited, plan.path, plan.n_experts, 1)
    want = _logits(StandardizedTransformer(edited, tokenizer=model.tokenizer, check=False), batch)
    got = _logits(model, batch, lambda m: ablate_experts(m, layer, 1))
    before = _logits(model, batch)
    assert float((got - before).abs().max()) > 1e-3  # the ablation changes the output
    # float32 rounding: the router's matmul has 3 rows instead of 4, the softmax sums 3 terms instead of 4 with a 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, bias", [("gpt_oss", "bias"), ("deepseek_v3", "e_score_correction_bias")])
def test_ablation_equals_gate_bias_edited_by_hand_bitwise(loaded, family, bias):
    """Where the gate has a per-expert bias (GPT-OSS's logit bias, DeepSeek-V3's selection bias), setting expert
    1's bias to the lowest float by hand gives the same logits as unilens's ablation, bitwise."""
    plain, model, batch = loaded[family]
    layer = _layer(model)
    edited = copy.deepcopy(plain)
    router_path = next(f"{model._routing_setup.plan(layer).path}.{name}" for name, child in
                       model._routing_setup.plan(layer).block.named_children()
                       if child is model._routing_setup.plan(layer).router)
    with torch.no_grad():
        getattr(edited.get_submodule(router_path), bias)[1] = torch.finfo(torch.float32).min
    want = _logits(StandardizedTransformer(edited, tokenizer=model.tokenizer, check=False), batch)
    got = _logits(model, batch, lambda m: ablate_experts(m, layer, 1))
    assert torch.equal(got, want), float((got - want).abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_expert_outputs_and_shared_expert_sum_to_the_moe_output(loaded, family):
    _, model, batch = loaded[family]
    layer = _layer(model)
    shared = model._routing_setup.reason("shared_expert_output", layer) is None
    assert shared == (family == "deepseek_v3")
    names = [f"expert_outputs.{layer}", f"expert_indices.{layer}", f"mlps_output.{layer}", f"mlps_input.{layer}"]
    acts = model.read(batch, names + ([f"shared_expert_output.{layer}"] if shared else []))
    per_expert = acts[f"expert_outputs.{layer}"]  # (batch, seq, n_experts, hidden)
    total = per_expert.sum(-2) + (acts[f"shared_expert_output.{layer}"] if shared else 0)
    torch.testing.assert_close(total, acts[f"mlps_output.{layer}"], rtol=0, atol=1e-6)
    # zero exactly where a token was not routed (real tokens: a padding position's input is zero here)
    routed = torch.zeros(per_expert.shape[:3], dtype=torch.bool)
    routed.scatter_(-1, acts[f"expert_indices.{layer}"], True)
    real = batch["attention_mask"].bool()
    assert torch.equal((per_expert.abs().sum(-1) > 0)[real], routed[real])
    if shared:  # DeepSeek-V3 adds its shared expert's output as is: the module's own output on the MoE input
        module = model._routing_setup.plan(layer).shared
        with torch.no_grad():
            want = module(acts[f"mlps_input.{layer}"])
        torch.testing.assert_close(acts[f"shared_expert_output.{layer}"], want, rtol=0, atol=1e-6)


def test_qwen2_moe_shared_expert_output_is_the_gated_shared_expert():
    model = StandardizedTransformer(*tiny_model("qwen2_moe"))
    acts = model.read(TEXTS[0], ["mlps_input.0", "shared_expert_output.0", "expert_outputs.0", "mlps_output.0"])
    block = model.module_accessor.get_mlp(0)
    x = acts["mlps_input.0"]
    with torch.no_grad():
        want = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    torch.testing.assert_close(acts["shared_expert_output.0"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(acts["expert_outputs.0"].sum(-2) + want, acts["mlps_output.0"], rtol=0, atol=1e-6)


def _family_routing(family: str, router, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and weights from the router logits ``(tokens, E)`` by the family's published formula."""
    k = router.top_k
    if family == "gpt_oss":  # top-k of the logits, softmax over those k
        values, indices = torch.topk(logits, k, dim=-1)
        return indices, torch.softmax(values, dim=-1)
    if family == "deepseek_v3":  # sigmoid scores; selection with the correction bias; normalized, scaled
        scores = logits.sigmoid()
        indices = torch.topk(scores + router.e_score_correction_bias, k, dim=-1)[1]
        weights = scores.gather(1, indices)
        if router.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return indices, weights * router.routed_scaling_factor
    probs = torch.softmax(logits.float(), dim=-1)  # Mixtral, Qwen3-MoE: softmax, top-k, renormalized
    weights, indices = torch.topk(probs, k, dim=-1)
    if getattr(router, "norm_topk_prob", True):
        weights = weights / weights.sum(-1, keepdim=True)
    return indices, weights


@pytest.mark.parametrize("family", FAMILIES)
def test_indices_and_weights_follow_from_router_logits(loaded, family):
    _, model, batch = loaded[family]
    layer = _layer(model)
    acts = model.read(batch, [f"router_logits.{layer}", f"expert_indices.{layer}", f"expert_weights.{layer}"])
    logits = acts[f"router_logits.{layer}"]
    n_experts = logits.shape[-1]
    indices, weights = _family_routing(family, model._routing_setup.plan(layer).router, logits.reshape(-1, n_experts))
    got_i, got_w = acts[f"expert_indices.{layer}"].reshape(indices.shape), acts[f"expert_weights.{layer}"]
    order, got_order = indices.argsort(-1), got_i.argsort(-1)  # top-k order may differ (sorted=False)
    assert torch.equal(indices.gather(1, order), got_i.gather(1, got_order))
    torch.testing.assert_close(weights.gather(1, order), got_w.reshape(weights.shape).gather(1, got_order),
                               rtol=1e-6, atol=1e-7)


def test_editing_router_logits_reroutes_through_the_familys_own_code(loaded):
    _, model, batch = loaded["mixtral"]
    with torch.no_grad(), model.trace(batch):
        logits = model.router_logits[1]
        boosted = logits.clone()
        boosted[..., 3] = 100.0
        model.router_logits[1] = boosted
        chosen = model.expert_indices[1].save()
        weights = model.expert_weights[1].save()
    assert bool((chosen == 3).any(-1).all())
    # softmax of a 100-logit, renormalized over the top 2: expert 3 takes (almost) all the weight
    assert float(weights.max(-1).values.min()) > 0.999


def test_forced_routing_equals_the_experts_module_called_by_hand(loaded):
    _, model, batch = loaded["qwen3_moe"]
    with torch.no_grad(), model.trace(batch):
        x = model.mlps_input[1].save()
        force_routing(model, 1, [0, 3], weights=[0.25, 0.75])
        out = model.mlps_output[1].save()
    experts = model._routing_setup.plan(1).experts
    tokens = x.reshape(-1, x.shape[-1])
    with torch.no_grad():
        want = experts(tokens, torch.tensor([[0, 3]]).expand(tokens.shape[0], 2),
                       torch.tensor([[0.25, 0.75]]).expand(tokens.shape[0], 2))
    torch.testing.assert_close(out.reshape(want.shape), want, rtol=0, atol=1e-6)


def test_routing_statistics_count_the_selected_experts(loaded):
    _, model, _ = loaded["qwen3_moe"]
    texts = ["The cat sat on the mat", "Hello", "One two three four five"]
    stats = routing_statistics(model, texts, batch_size=2)
    enc = model.tokenizer(texts, return_tensors="pt", padding=True)
    acts = model.read({"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}, ["expert_indices.0"])
    chosen = acts["expert_indices.0"][enc.attention_mask.bool()]  # (real tokens, k)
    want = torch.bincount(chosen.flatten(), minlength=4).double()
    torch.testing.assert_close(stats.load[0], want / want.sum())
    assert stats.tokens == int(enc.attention_mask.sum())
    assert 0.0 < stats.entropy[0] < float(torch.log(torch.tensor(4.0)))


@pytest.mark.parametrize("family", ["deepseek_v3", "mixtral"])
def test_per_expert_logit_attribution_adds_up_to_the_mlp_term(loaded, family):
    """The experts' terms (+ the shared expert's) are the MLP's term of direct_logit_attribution."""
    _, model, _ = loaded[family]
    layer = _layer(model)
    att = expert_logit_attribution(model, "The capital of France is", " Paris", layer=layer)
    dla = direct_logit_attribution(model, "The capital of France is", " Paris", heads=False)
    total = att.experts.sum() + (att.shared or 0.0)
    assert abs(float(total) - float(dla["mlp"][layer])) < 1e-5
    routed = set(att.routed)
    assert all(float(att.experts[e]) == 0.0 for e in range(att.experts.numel()) if e not in routed)


def test_dense_layers_and_dense_models_refuse_with_the_reason(loaded):
    _, model, batch = loaded["deepseek_v3"]  # layer 0 is dense (first_k_dense_replace)
    with pytest.raises(UnsupportedRouting, match=r"router_logits\[0\].*no sparse mixture-of-experts block"):
        model.read(batch, ["router_logits.0"])
    assert list(model.read(batch, ["router_logits.*"])) == ["router_logits.1"]
    _, mixtral, mixtral_batch = loaded["mixtral"]
    with pytest.raises(UnsupportedRouting, match="no shared expert"):
        mixtral.read(mixtral_batch, ["shared_expert_output.0"])
    dense = StandardizedTransformer(*tiny_model("llama"), check=False)
    with pytest.raises(UnsupportedHookPoint, match="no sparse mixture-of-experts"):
        dense.read("Hello", ["expert_indices.0"])
    with pytest.raises(IndexError, match="out of range: layer 1's router has 4 experts"):
        with model.trace(batch):
            ablate_experts(model, 1, 7)


def test_routing_only_families_refuse_the_dispatch_names():
    """JetMoE groups the tokens per expert: its router logits are served, the per-token dispatch names refused."""
    model = StandardizedTransformer(*tiny_model("jetmoe"), check=False)
    logits = model.read("Hello world", ["router_logits.0"])["router_logits.0"]
    assert logits.shape[-1] == 4
    with pytest.raises(UnsupportedRouting, match="does not call its experts with per-token"):
        model.read("Hello world", ["expert_indices.0"])


def test_routing_and_other_reads_in_one_trace_any_order(loaded):
    _, model, batch = loaded["gpt_oss"]
    acts = model.read(batch, ["logits", "expert_weights.1", "router_logits.0", "layers_output.0", "expert_outputs.1"])
    assert tuple(acts["expert_outputs.1"].shape[2:]) == (4, model.hidden_size)
    with torch.no_grad(), model.trace(batch):
        saved = save([model.router_logits[0], model.expert_indices[0], model.layers_output[0]])
    assert saved[1].dtype == torch.int64 and saved[1].shape[-1] == 2
