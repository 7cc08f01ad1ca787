"""An edit of ``attn.hook_v`` through ``run_with_hooks`` equals the same edit made by a plain torch hook on HF's own
``v_proj`` output, when both run the same attention implementation.

unilens keeps the model's own kernel (sdpa) on every layer where no attention internal is touched, and runs its
hookable eager attention (HF's eager formula) on the edited layer. So the reference is HF with eager attention on
that layer and the original implementation elsewhere; against it the logits are equal to the bit (the same
operations in the same order), on a grouped-query model (4 query heads over 2 kv heads). Against HF with sdpa or
eager on *every* layer they differ by float32 rounding only: on SmolLM2 the issue-24 prompt "When Mary and John
went to the store, John gave a drink to" with blocks.2.attn.hook_v x0.5 measured 2.9e-3 vs all-eager, 2.2e-3 vs
all-sdpa, 0 vs eager-on-layer-2 / sdpa elsewhere, and 0 vs all-eager once unilens is loaded with
attn_implementation="eager"; HF's own float32 eager is 6.7e-3 away from a float64 run on that input.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from unilens import StandardizedTransformer
from unilens.testing import tiny_model

PROMPT = "When Mary and John went to the store, John gave a drink to"
LAYER = 1


def _eager_on_edited_layer(module, query, key, value, attention_mask, **kwargs):
    """HF's eager attention on layer LAYER, sdpa elsewhere (both take the additive eager mask)."""
    if module.layer_idx == LAYER:
        return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("test_eager_on_layer_1", _eager_on_edited_layer)
AttentionMaskInterface.register("test_eager_on_layer_1", eager_mask)


def _halve(value, hook):
    return value * 0.5


def _hf_edited_logits(reference, ids):
    handle = reference.model.layers[LAYER].self_attn.v_proj.register_forward_hook(lambda m, a, out: out * 0.5)
    try:
        with torch.no_grad():
            return reference(input_ids=ids).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("original", ["sdpa", "eager"])
def test_hook_v_edit_equals_hf_v_proj_edit(original):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = StandardizedTransformer(*tiny_model("llama", attn_implementation=original), check=False)
        reference, _ = tiny_model("llama", attn_implementation=original)  # same seed: the same weights
    assert model.num_kv_heads < model.num_heads  # grouped-query: the edit is on kv heads
    if original == "sdpa":
        reference.config._attn_implementation = "test_eager_on_layer_1"
    ids = model.to_tokens(PROMPT)
    with torch.no_grad():
        edited = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.attn.hook_v", _halve)])
        plain = model.run_with_hooks(ids)
    edited, plain = getattr(edited, "logits", edited), getattr(plain, "logits", plain)
    expected = _hf_edited_logits(reference, ids)
    assert float((expected - plain).abs().max()) > 1e-3  # the edit moves the logits
    torch.testing.assert_close(edited, expected, rtol=0, atol=0)  # same operations, same order: equal to the bit
