"""A keyword the caller gives the model's forward that the forward does not take is reported as the caller's
(``UnknownForwardKeyword``, naming it); a keyword the architecture itself passes to the attention function that
unilens does not know keeps its report (``UnknownAttentionKeyword``: please report the architecture)."""

from __future__ import annotations

import warnings

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.hooks.attention import UnknownAttentionKeyword, UnknownForwardKeyword
from unilens.testing import tiny_model


@pytest.fixture(scope="module")
def llama():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StandardizedTransformer(*tiny_model("llama"), check=False)


def test_unknown_keyword_from_the_caller_is_named(llama):
    hf = llama.module_accessor.model
    ids = llama.to_tokens("Hello world")
    with pytest.raises(UnknownForwardKeyword,
                       match=r"^unilens: return_type= is not an argument of LlamaForCausalLM.forward .*remove it "
                             r"from the call \(return_type=: TransformerLens's"):
        hf(input_ids=ids, return_type="loss")
    with pytest.raises(UnknownForwardKeyword, match=r"foo_bar= is not an argument of LlamaForCausalLM.forward"):
        with llama.trace(ids, foo_bar=1):
            llama.logits.save()
    with torch.no_grad():  # the keywords of one call do not stick to the next
        assert hf(input_ids=ids).logits.shape[:2] == ids.shape


def test_unknown_keyword_from_the_architecture_keeps_its_report(llama):
    hf = llama.module_accessor.model
    ids = llama.to_tokens("Hello world")
    attn = hf.model.layers[0].self_attn

    def new_kwarg(module, args, kwargs):  # an architecture that starts passing a new keyword to its attention
        return args, {**kwargs, "new_bias": torch.ones(1)}

    handle = attn.register_forward_pre_hook(new_kwarg, with_kwargs=True)
    try:
        with pytest.raises(UnknownAttentionKeyword, match=r"LlamaAttention passed new_bias= .*Please report this "
                                                          r"architecture"):
            hf(input_ids=ids)
        # the caller passing the same name too: the caller's keyword is what is reported
        with pytest.raises(UnknownForwardKeyword, match="new_bias= is not an argument"):
            hf(input_ids=ids, new_bias=torch.ones(1))
    finally:
        handle.remove()
