"""Tests for the tiny model zoo (`unilens.testing`): tokenizer, configs, models, feature coverage."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from unilens.testing import (
    ZOO_REQUIRED,
    all_causal_model_types,
    make_tokenizer,
    tiny_config,
    tiny_model,
    try_build,
)

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "When Mary and John went to the store, John gave a drink to"]


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------


def test_leading_space_tokenises_differently():
    tok = make_tokenizer(512)
    assert tok(" Paris").input_ids != tok("Paris").input_ids
    # GPT-2 convention: the space is part of the following token, so " Paris" is not "Paris" + 1 token.
    assert tok.convert_ids_to_tokens(tok(" Paris").input_ids)[0].startswith("\u0120")  # "Ġ" marks a space


def test_tokenizer_round_trip_and_specials():
    tok = make_tokenizer(512)
    for text in PROMPTS + [" Paris", "naïve café ✓ 123"]:  # non-ASCII exercises the byte fallback
        ids = tok(text).input_ids
        assert tok.decode(ids) == text
    assert len(tok) <= 512
    specials = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    assert len(specials) == 4 and all(i is not None and 0 <= i < len(tok) for i in specials)


def test_tokenizer_left_padding():
    tok = make_tokenizer(512)
    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    short = tok(PROMPTS[0]).input_ids
    n_pad = batch.input_ids.shape[1] - len(short)
    assert n_pad > 0
    assert batch.input_ids[0, :n_pad].eq(tok.pad_token_id).all()
    assert batch.input_ids[0, n_pad:].tolist() == short
    assert batch.attention_mask[0].tolist() == [0] * n_pad + [1] * len(short)


def test_tokenizer_small_vocab_and_fresh_objects():
    tok = make_tokenizer(260)  # bytes + specials only: no merges
    assert len(tok) == 260
    assert tok.decode(tok("Paris").input_ids) == "Paris"
    a, b = make_tokenizer(512), make_tokenizer(512)
    a.padding_side = "right"  # a caller mutating its tokenizer must not affect the next caller
    assert b.padding_side == "left" and make_tokenizer(512).padding_side == "left"
    with pytest.raises(ValueError, match="too small"):
        make_tokenizer(100)


def test_tokenizer_training_is_deterministic():
    # Two independent trainings (fresh Rust hash maps, so fresh hash seeds) give the same vocab/merges.
    from unilens.testing import _tokenizer_json

    assert _tokenizer_json.__wrapped__(512) == _tokenizer_json.__wrapped__(512)


# ------------------------------------------------------------------------------------------
# The 29 required types
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_required_type_builds_and_runs(model_type):
    model, tok = tiny_model(model_type)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    n_embeddings = model.get_input_embeddings().num_embeddings
    assert len(tok) <= n_embeddings
    assert 0 <= tok.pad_token_id < n_embeddings

    batch = tok(PROMPTS, padding=True, return_tensors="pt")
    assert batch.attention_mask[0].eq(0).any()  # the batch really is padded
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    logits = out.logits
    assert logits.shape[:2] == batch.input_ids.shape
    assert logits.shape[-1] >= len(tok)
    assert torch.isfinite(logits).all()
    # Not degenerate: the vocabulary distribution varies, and differs between positions.
    assert logits[1, -1].std() > 1e-3
    assert (logits[1, -1] - logits[1, 0]).abs().max() > 1e-3
    n_layers = len(_decoder_layers(model))
    assert len(out.hidden_states) == n_layers + 1
    assert all(h.shape[:2] == batch.input_ids.shape for h in out.hidden_states)
    # Tokenizer round trip on the prompts (pad tokens dropped).
    assert tok.batch_decode(batch.input_ids, skip_special_tokens=True) == PROMPTS


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The longest ModuleList in the model (the decoder stack), found independently of the config."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len)


def test_seeded_and_dropout_free():
    a, _ = tiny_model("llama", seed=3)
    b, _ = tiny_model("llama", seed=3)
    c, _ = tiny_model("llama", seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    for model_type in ZOO_REQUIRED:
        cfg = tiny_config(model_type).to_dict()
        for key, value in cfg.items():
            if "dropout" in key or "pdrop" in key:
                assert value in (0, 0.0, None), (model_type, key, value)


def test_overrides_win():
    cfg = tiny_config("llama", hidden_size=32, num_attention_heads=2)
    assert (cfg.hidden_size, cfg.num_attention_heads) == (32, 2)
    model, _ = tiny_model("gpt2", n_layer=3)
    assert len(model.transformer.h) == 3


def test_bert_like_is_causal_decoder():
    cfg = tiny_config("bert")
    assert cfg.is_decoder is True


# ------------------------------------------------------------------------------------------
# Features are actually exercised at tiny size
# ------------------------------------------------------------------------------------------


def _last_logits(model_type: str, **overrides) -> torch.Tensor:
    model, tok = tiny_model(model_type, seed=0, **overrides)
    batch = tok(PROMPTS[1:], return_tensors="pt")  # 12+ tokens > window of 4
    assert batch.input_ids.shape[1] > 8
    with torch.no_grad():
        return model(**batch).logits[0, -1]


@pytest.mark.parametrize("model_type", ["mistral", "gemma2", "gemma3_text", "gpt_oss"])
def test_sliding_window_is_exercised(model_type):
    cfg = tiny_config(model_type)
    assert cfg.sliding_window is not None and cfg.sliding_window < 8
    # Same seed, window wider than the prompt: the last position's output must change.
    wide = _last_logits(model_type, sliding_window=128)
    assert not torch.allclose(_last_logits(model_type), wide, atol=1e-6)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "gpt_oss"])
def test_mixed_sliding_and_full_layers(model_type):
    assert set(tiny_config(model_type).layer_types) == {"sliding_attention", "full_attention"}


def test_gemma2_softcap_is_exercised():
    cfg = tiny_config("gemma2")
    assert cfg.attn_logit_softcapping and cfg.final_logit_softcapping
    soft = _last_logits("gemma2")
    # A soft-cap value small enough to bind changes the attention scores and so the output.
    assert not torch.allclose(soft, _last_logits("gemma2", attn_logit_softcapping=0.1), atol=1e-6)
    assert _last_logits("gemma2").abs().max() < cfg.final_logit_softcapping


def test_gpt_oss_has_sinks():
    model, _ = tiny_model("gpt_oss")
    sinks = [p for n, p in model.named_parameters() if n.endswith("sinks")]
    assert len(sinks) == model.config.num_hidden_layers


# (experts-count key, top-k key) per MoE type, from each architecture's config documentation.
MOE_KEYS = {
    "mixtral": ("num_local_experts", "num_experts_per_tok"),
    "qwen2_moe": ("num_experts", "num_experts_per_tok"),
    "qwen3_moe": ("num_experts", "num_experts_per_tok"),
    "deepseek_v3": ("n_routed_experts", "num_experts_per_tok"),
    "glm4_moe": ("n_routed_experts", "num_experts_per_tok"),
    "gpt_oss": ("num_local_experts", "num_experts_per_tok"),
}


@pytest.mark.parametrize("model_type", [*MOE_KEYS, "dbrx"])
def test_moe_routes_top_k_of_several(model_type):
    cfg = tiny_config(model_type)
    if model_type == "dbrx":
        n_experts, top_k = cfg.ffn_config.moe_num_experts, cfg.ffn_config.moe_top_k
    else:
        n_experts, top_k = (getattr(cfg, k) for k in MOE_KEYS[model_type])
    assert n_experts > 1 and 1 < top_k < n_experts
    model, _ = tiny_model(model_type)
    # Some layer must hold a router: a 2-D weight with one row per expert, randomly initialised.
    routers = [
        p for n, p in model.named_parameters()
        if p.dim() == 2 and p.shape[0] == n_experts and p.shape[1] == _hidden(cfg) and ("gate" in n or "router" in n)
    ]  # fmt: skip
    assert routers and all(r.std() > 1e-3 for r in routers)


def _hidden(cfg) -> int:
    return getattr(cfg, "hidden_size", None) or cfg.d_model


def test_deepseek_v3_uses_mla_and_mixes_dense_and_moe():
    model, _ = tiny_model("deepseek_v3")
    names = [n for n, _ in model.named_parameters()]
    assert any("kv_a_proj_with_mqa" in n for n in names)  # the MLA latent projection
    assert any("layers.0.mlp.gate_proj" in n for n in names)  # layer 0 dense
    assert any("layers.1.mlp.gate" in n and "experts" not in n for n in names)  # layer 1 routed


# ------------------------------------------------------------------------------------------
# Every causal-LM type
# ------------------------------------------------------------------------------------------


def _lock_support() -> dict:
    """docs/support.json: the support report made on the locked versions (test_support_report_is_the_locks)."""
    return json.loads((ROOT / "docs" / "support.json").read_text())


def test_support_report_is_the_locks():
    """The committed support report was made with the locked torch / transformers / nnsight (regenerate with
    `make support` after `make lock`): the model types the suite enumerates are the lock's, whatever is installed."""
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", lock, re.M))
    versions = _lock_support()["versions"]
    assert versions == {name: pins[name] for name in versions}, "docs/support.json is not the lock's: make support"


def test_every_type_the_lock_builds_builds():
    """One sweep over the lock's ~196 causal-LM types (~10-25 s on 2 cores, 1 thread): every type that built on the
    locked versions builds and runs here. The types come from the lock's report, not from the installed
    transformers: a type a newer release adds is `make compat`'s business (docs/compat.md), not CI's."""
    installed = set(all_causal_model_types())
    locked = {row["model_type"]: row["builds"] for row in _lock_support()["rows"]}
    types = [t for t in locked if t in installed]
    assert set(ZOO_REQUIRED) <= set(types), set(ZOO_REQUIRED) - set(types)
    start = time.perf_counter()
    results = {t: try_build(t) for t in types}
    failed = {t: r[1] for t, r in results.items() if not r[0]}
    print(f"\nbuilt {len(types) - len(failed)}/{len(types)} in {time.perf_counter() - start:.1f}s; failed: {failed}")
    assert sum(locked[t] for t in types) >= 170
    assert not {t for t in failed if locked[t]}, failed
    assert not (set(ZOO_REQUIRED) & set(failed))
