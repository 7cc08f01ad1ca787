"""nnterp compatibility: every public nnterp 1.3 function and constructor option, on the 29 named types (tiny) and
SmolLM2, under nnterp's module paths (``import unilens as nnterp``).

Expected values come from oracles, never from unilens: HF's own forward (``output_hidden_states``,
``output_attentions`` of an eager twin with the same weights, ``generate``), plain torch hooks on the HF modules, and
hand-built strings / chats. Module names used by the oracles are HF's (a small table below), not unilens's discovery.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unilens as nnterp
from unilens.analysis.lens import (
    TargetPrompt,
    TargetPromptBatch,
    it_repeat_prompt,
    logit_lens,
    patch_object_attn_lens,
    patchscope_generate,
    patchscope_lens,
    repeat_prompt,
)
from unilens.analysis.prompts import (
    Prompt,
    TokenizationError,
    get_first_tokens,
    next_token_probs_unsqueeze,
    run_prompts,
)
from unilens.arch.discovery import ModuleMap
from unilens.compat.nnsight_utils import (
    ModuleAccessor,
    collect_last_token_activations_session,
    collect_token_activations_batched,
    compute_next_token_probs,
    get_attention,
    get_attention_output,
    get_embed_tokens,
    get_layer,
    get_layer_input,
    get_layer_output,
    get_layers,
    get_logits,
    get_mlp,
    get_mlp_output,
    get_next_token_probs,
    get_num_layers,
    get_token_activations,
    get_unembed,
    get_unembed_norm,
    project_on_vocab,
    set_layer_output,
)
from unilens.compat.nnterp import (
    AttnProbFunction,
    IOType,
    LayerAccessor,
    RenameConfig,
    RenamingError,
    check_io,
    check_model_renaming,
    expand_path_with_model,
    get_hidden_size,
    get_ignores,
    get_num_attention_heads,
    get_rename_dict,
    get_vocab_size,
    text_config,
)
from unilens.model.transformer import StandardizedTransformer
from unilens.testing import ZOO_REQUIRED, tiny_model

PROMPT = "The capital of France is"
OTHER = "One, two, three,"
TARGET = "cat cat\nsun sun\n?"

# HF's module names of each type's attention and MLP inside a decoder layer (the oracle's own map; OPT's MLP is the
# bare fc1 -> fc2 pair). Default: ("self_attn", "mlp").
HF_PARTS = {
    "gpt2": ("attn", "mlp"), "gptj": ("attn", "mlp"), "gpt_neox": ("attention", "mlp"),
    "bloom": ("self_attention", "mlp"), "opt": ("self_attn", None), "dbrx": ("norm_attn_norm.attn", "ffn"),
    "falcon": ("self_attention", "mlp"),
}  # fmt: skip


def parts_of(model_type: str) -> tuple[str, str | None]:
    return HF_PARTS.get(model_type, ("self_attn", "mlp"))


# ------------------------------------------------------------------------------------------
# Oracle helpers: plain HF forwards and torch hooks
# ------------------------------------------------------------------------------------------


def hf_layers(hf: nn.Module) -> nn.ModuleList:
    """The decoder stack: the ModuleList of num_hidden_layers modules holding the most parameters."""
    cfg = getattr(hf.config, "text_config", None) or hf.config
    n = next(getattr(cfg, k) for k in ("num_hidden_layers", "n_layer", "n_layers") if getattr(cfg, k, None))
    lists = [m for m in hf.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def ids_of(tok, text: str) -> torch.Tensor:
    return tok(text, return_tensors="pt")["input_ids"]


@torch.no_grad()
def hf_run(hf, ids: torch.Tensor, hooks=()):
    """HF forward with ``(module, kind, fn)`` hooks (kind "forward" / "pre") attached for this call only."""
    handles = [m.register_forward_hook(fn) if kind == "forward" else m.register_forward_pre_hook(fn, with_kwargs=True)
               for m, kind, fn in hooks]
    try:
        return hf(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()


def replace_output(fn):
    """A forward hook applying ``fn`` to the module's hidden-state output (tensor or first element of a tuple)."""

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]), *output[1:])
        return fn(output)

    return hook


def set_at(position: int, value: torch.Tensor):
    def fn(h):
        h = h.clone()
        h[:, position] = value.to(h.dtype)
        return h

    return fn


def hidden_arg_hook(fn):
    """A forward pre-hook (with kwargs) applying ``fn`` to the module's hidden-state input."""

    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        return args, {**kwargs, key: fn(kwargs[key])}

    return hook


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=atol, rtol=1e-4)


def check_steer(model, hf, ids: torch.Tensor, layers, layer: int, ref) -> None:
    """nnterp's ``steer(layer, v, 2.0, None, -1, 1)`` on two copies of PROMPT: row 1 equals HF with ``2 v`` added to the
    layer's output at the last position (a torch hook), row 0 equals the unsteered ``ref``."""
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), model.trace([PROMPT, PROMPT]):
        model.steer(layer, vector, 2.0, None, -1, 1)  # layers, steering_vector, factor, positions, token_positions, batch
        steered = model.logits.save()

    def add(h):
        h = h.clone()
        h[:, -1] += 2.0 * vector
        return h

    close(steered[1], hf_run(hf, ids, [(layers[layer], "forward", replace_output(add))]).logits[0], atol=1e-4)
    close(steered[0], ref.logits[0], atol=1e-4)


_ZOO: dict[str, tuple] = {}


def zoo(model_type: str):
    """(model, hf, tok): one tiny model per type for the whole module (load-time check on)."""
    if model_type not in _ZOO:
        hf, tok = tiny_model(model_type)
        _ZOO[model_type] = (StandardizedTransformer(hf, tokenizer=tok), hf, tok)
    return _ZOO[model_type]


@pytest.fixture(scope="module")
def smol():
    from unilens import load_default

    model = load_default()
    return model, model.module_accessor.model, model.tokenizer


# ------------------------------------------------------------------------------------------
# Module paths: `import unilens as nnterp` finds nnterp's names
# ------------------------------------------------------------------------------------------


def test_module_paths_and_top_level_names():
    import unilens.interventions
    import unilens.nnsight_utils
    import unilens.prompt_utils
    import unilens.rename_utils
    import unilens.standardized_transformer

    assert nnterp.StandardizedTransformer is unilens.standardized_transformer.StandardizedTransformer
    assert nnterp.ModuleAccessor is unilens.nnsight_utils.ModuleAccessor
    assert nnterp.get_rename_dict is unilens.rename_utils.get_rename_dict
    assert issubclass(RenamingError, Exception) and issubclass(TokenizationError, Exception)


# ------------------------------------------------------------------------------------------
# Every named type: nnsight_utils, lenses, patchscope, constructor options
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_nnsight_utils_and_lenses(model_type):
    model, hf, tok = zoo(model_type)
    ids = ids_of(tok, PROMPT)
    ref = hf_run(hf, ids)
    hs, n = ref.hidden_states, len(ref.hidden_states) - 1
    assert get_num_layers(model) == n and len(get_layers(model)) == n
    assert get_layer(model, 0)._module is hf_layers(hf)[0]
    attn_name, mlp_name = parts_of(model_type)
    assert get_attention(model, 0)._module is hf_layers(hf)[0].get_submodule(attn_name)
    if mlp_name is not None:
        assert get_mlp(model, 0)._module is hf_layers(hf)[0].get_submodule(mlp_name)
    assert get_embed_tokens(model)._module is hf.get_input_embeddings()
    assert get_unembed(model)._module is hf.get_output_embeddings()

    saved = {}
    with torch.no_grad(), model.trace(ids):
        saved["in0"] = get_layer_input(model, 0).save()
        for i in range(n):
            saved[i] = get_layer_output(model, i).save()
        saved["logits"] = get_logits(model).save()
        saved["probs"] = get_next_token_probs(model).save()
    close(saved["in0"], hs[0])
    for i in range(n - 1):  # HF's last hidden state may already be normed
        close(saved[i], hs[i + 1])
    close(saved["logits"], ref.logits)
    close(saved["probs"], ref.logits[:, -1].softmax(-1))

    # logit lens: layer i's lens = HF's logits when the last layer outputs hidden_states[i + 1]
    lens, inv = logit_lens(model, PROMPT, return_inv_logits=True)
    assert lens.shape == (1, n, model.vocab_size)
    last = hf_layers(hf)[-1]
    for i in range(n):
        if i == n - 1:
            logits = ref.logits[0, -1]
        else:
            logits = hf_run(hf, ids, [(last, "forward", replace_output(lambda h, i=i: hs[i + 1]))]).logits[0, -1]
        close(lens[0, i], logits.softmax(-1))
        close(inv[0, i], (-logits).softmax(-1))

    # get_token_activations: each prompt's last real token, batched (padded) vs one HF run per prompt
    acts = get_token_activations(model, [PROMPT, OTHER], layers=[0])
    other = hf_run(hf, ids_of(tok, OTHER)).hidden_states
    assert acts.shape == (1, 2, model.hidden_size)
    close(acts[0, 0], hs[1][0, -1], atol=1e-4)
    close(acts[0, 1], other[1][0, -1], atol=1e-4)

    # patchscope_lens: the source's last-token state at layer 0 written into the target at its last token
    probs = patchscope_lens(model, PROMPT, TargetPrompt(TARGET, -1), layers=[0])
    target_ids = ids_of(tok, TARGET)
    patched = hf_run(hf, target_ids, [(hf_layers(hf)[0], "forward", replace_output(set_at(-1, hs[1][0, -1])))])
    close(probs[0, 0], patched.logits[0, -1].softmax(-1))


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_constructor_options(model_type, monkeypatch):
    attn_name, mlp_name = parts_of(model_type)
    hf, tok = tiny_model(model_type)
    ids = ids_of(tok, PROMPT)
    ref = hf_run(hf, ids)
    heads = hf.config.get_text_config().num_attention_heads if hasattr(hf.config, "get_text_config") else None
    # RenameConfig naming HF's modules, nnterp's options, rename= merged into the defaults
    config = RenameConfig(attn_name=attn_name, mlp_name=mlp_name, attn_head_config_key=7,
                          vocab_size_config_key="vocab_size")
    model = StandardizedTransformer(hf, tokenizer=tok, rename_config=config, check_renaming=True, allow_dispatch=False,
                                    check_attn_probs_with_trace=True, allow_multimodal=False,
                                    rename={attn_name.split(".")[-1]: "my_attn"})
    assert model.num_heads == 7 and heads is not None
    layer0 = hf_layers(hf)[0]
    assert model.attentions[0]._module is layer0.get_submodule(attn_name)
    envoy = model.layers[0]  # the user's alias, on the attention's parent
    for part in filter(None, attn_name.rpartition(".")[0].split(".")):
        envoy = getattr(envoy, part)
    assert envoy.my_attn._module is layer0.get_submodule(attn_name)
    with torch.no_grad(), model.trace(ids):
        attn_in = model.attentions_input[0].save()
        out = model.layers_output[0].save()
    close(out, ref.hidden_states[1])
    seen = []
    hf_run(hf, ids, [(layer0.get_submodule(attn_name), "pre",
                      hidden_arg_hook(lambda h: seen.append(h.clone()) or h))])
    close(attn_in, seen[0])

    # a RenameConfig naming a wrong module is refused; one naming no module is ignored with a warning (nnterp
    # ignores it: an unused rename entry), discovery's module kept
    norm = next(name for name, m in layer0.named_children() if "norm" in type(m).__name__.lower())
    for bad in (RenameConfig(mlp_name=norm), RenameConfig(hidden_size_config_key=3)):
        with pytest.raises(RenamingError):
            StandardizedTransformer(*tiny_model(model_type), rename_config=bad)
    hf_missing, tok_missing = tiny_model(model_type)
    with pytest.warns(UserWarning, match="attn_name='no_such_module'.*Ignored"):
        kept = StandardizedTransformer(hf_missing, tokenizer=tok_missing,
                                       rename_config=RenameConfig(attn_name="no_such_module"))
    assert kept.attentions[0]._module is ModuleMap(hf_missing).get_attention(0)

    # ignore_mlp / ignore_attn drop those accessors; the residual view stays (checked against HF at load)
    model = StandardizedTransformer(*tiny_model(model_type), rename_config=RenameConfig(ignore_mlp=True, ignore_attn=True))
    assert get_ignores(model, model.rename_config) == ["mlp", "attention"]
    with pytest.raises(Exception, match="no MLP|no single MLP"):
        with model.trace(PROMPT):
            model.mlps_output[0].save()
    assert model.architecture.attention_layers == []

    # check_renaming=False: no load-time check runs; legacy attn_rename= is a RenameConfig field
    import unilens.model.build  # the assembly step that runs the load-time check

    calls = []
    monkeypatch.setattr(unilens.model.build, "validate_model", lambda m, *a, **k: calls.append(m))
    StandardizedTransformer(*tiny_model(model_type), check_renaming=False, attn_rename=attn_name)
    assert calls == []
    StandardizedTransformer(*tiny_model(model_type), attn_rename=attn_name)
    assert len(calls) == 1


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_enable_attention_probs_equals_hf_eager(model_type):
    """enable_attention_probs=True (+ nnterp's trace check): probabilities equal HF's eager output_attentions."""
    hf, tok = tiny_model(model_type)
    twin, _ = tiny_model(model_type, attn_implementation="eager")  # same seed: same weights
    model = StandardizedTransformer(hf, tokenizer=tok, enable_attention_probs=True, check_attn_probs_with_trace=True)
    assert model.attn_probs_available and model.attention_probabilities.enabled
    ids = ids_of(tok, PROMPT)
    with torch.no_grad():
        ref = twin(input_ids=ids, output_attentions=True).attentions
    layer = model.architecture.attention_layers[0]
    with torch.no_grad(), model.trace(ids):
        probs = model.attention_probabilities[layer].save()
    assert ref is not None and ref[layer] is not None
    close(probs, ref[layer], atol=1e-5)
    model.attention_probabilities.disable()
    with pytest.raises(RenamingError, match="disabled"):
        model.attention_probabilities[layer]


# ------------------------------------------------------------------------------------------
# rename_utils
# ------------------------------------------------------------------------------------------


def test_rename_config_steers_discovery():
    """An attention class whose name discovery does not recognise: found only when RenameConfig names it."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    class Mixer(LlamaAttention):
        pass

    def disguised():
        hf, tok = tiny_model("llama")
        twin, _ = tiny_model("llama", attn_implementation="eager")
        for layer in hf.model.layers:
            layer.self_attn.__class__ = Mixer
        return hf, tok, twin

    hf, tok, _ = disguised()
    assert StandardizedTransformer(hf, tokenizer=tok).architecture.attention_layers == []
    hf, tok, twin = disguised()
    model = StandardizedTransformer(hf, tokenizer=tok, rename_config=RenameConfig(attn_name="self_attn"))
    assert model.architecture.attention_layers == [0, 1]
    assert model.attentions[1]._module is hf.model.layers[1].self_attn
    ids = ids_of(tok, PROMPT)
    with torch.no_grad(), model.trace(ids):
        probs = model.attention_probabilities[1].save()
    with torch.no_grad():
        close(probs, twin(input_ids=ids, output_attentions=True).attentions[1])
    # the stack, final norm and unembedding by name (paths or names), as nnterp's fields take them
    hf, tok = tiny_model("gpt2")
    model = StandardizedTransformer(hf, tokenizer=tok, rename_config=RenameConfig(
        layers_name="h", ln_final_name="transformer.ln_f", lm_head_name=["no_head", "lm_head"], model_name="transformer"))
    assert model.layers._module is hf.transformer.h and model.ln_final._module is hf.transformer.ln_f
    assert model.lm_head._module is hf.lm_head and model.model._module is hf.transformer


class OwnSourceProbs(AttnProbFunction):
    """nnterp's way: the probabilities are the output of one operation in the attention module's own forward."""

    def __init__(self, operation: str):
        self.operation = operation

    def get_attention_prob_source(self, attention_module, return_module_source=False):
        if return_module_source:
            return attention_module.source
        return getattr(attention_module.source, self.operation)


class NnterpDefaultProbs(AttnProbFunction):
    """nnterp 1.3's default source (llama and most types): the dropout inside transformers' eager_attention_forward."""

    def get_attention_prob_source(self, attention_module, return_module_source=False):
        if return_module_source:
            return attention_module.source.attention_interface_0.source
        return attention_module.source.attention_interface_0.source.nn_functional_dropout_0


class WrongProbs(AttnProbFunction):
    def get_attention_prob_source(self, attention_module, return_module_source=False):
        return attention_module.query_key_value  # a projection, not the probabilities


# Types whose attention computes softmax(scores) inline in its own forward (the operation whose output is the
# probabilities, and the dropout module applied to them, if any); every other named type calls an attention function
# (transformers' AttentionInterface), whose eager source that model never runs under unilens. Falcon computed
# softmax inline until transformers 5.25, which moved it to the attention interface.
OWN_PROB_SOURCE = {"bloom": ("self_attention_dropout_0", "attention_dropout")}


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_attn_prob_function_supplies_probabilities(model_type):
    """A custom AttnProbFunction: read (and written) through its source, equal to HF eager's output_attentions; where
    the model has no such source (an attention function), nnterp's default source is refused with the reason."""
    if model_type not in OWN_PROB_SOURCE:
        with pytest.raises(RenamingError, match="attn_prob_source could not be read.*eager_attention_forward"):
            StandardizedTransformer(*tiny_model(model_type), rename_config=RenameConfig(
                attn_prob_source=NnterpDefaultProbs()))
        return
    operation, dropout = OWN_PROB_SOURCE[model_type]
    hf, tok = tiny_model(model_type)
    twin, _ = tiny_model(model_type, attn_implementation="eager")
    model = StandardizedTransformer(hf, tokenizer=tok, rename_config=RenameConfig(
        attn_prob_source=OwnSourceProbs(operation)))
    assert model.attention_probabilities.custom
    ids = ids_of(tok, PROMPT)
    with torch.no_grad():
        ref = twin(input_ids=ids, output_attentions=True).attentions
    with torch.no_grad(), model.trace(ids):
        probs = model.attention_probabilities[1].save()
    close(probs.reshape(ref[1].shape), ref[1])
    # setting them through the source: the logits of HF eager with the same probabilities put in by a torch hook
    uniform = torch.tril(torch.ones(ids.shape[1], ids.shape[1]))
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand_as(probs).contiguous()
    with torch.no_grad(), model.trace(ids):
        model.attention_probabilities[1] = uniform
        edited = model.logits.save()
    assert not torch.allclose(edited, hf_run(hf, ids).logits)
    if dropout is not None:
        module = hf_layers(twin)[1].get_submodule(parts_of(model_type)[0]).get_submodule(dropout)
        close(edited, hf_run(twin, ids, [(module, "forward", lambda m, a, o: uniform)]).logits, atol=1e-4)
    with pytest.raises(RenamingError):
        StandardizedTransformer(*tiny_model(model_type), rename_config=RenameConfig(attn_prob_source=WrongProbs()))


def test_rename_utils_functions():
    hf, tok = tiny_model("gpt2")
    assert get_num_attention_heads(hf) == hf.config.n_head
    assert get_hidden_size(hf) == hf.config.n_embd and get_vocab_size(hf) == hf.config.vocab_size
    assert get_num_attention_heads(hf, rename_config=RenameConfig(attn_head_config_key=["nope", "n_head"])) == hf.config.n_head
    assert get_hidden_size(hf, raise_error=False, rename_config=RenameConfig(hidden_size_config_key=11)) == 11
    assert text_config(hf) is hf.config
    assert expand_path_with_model(["model.layers"]) == ["model.layers"] + [
        f"model.{c}.layers" for c in ("transformer", "gpt_neox", "decoder", "language_model")]
    rename = get_rename_dict(RenameConfig(attn_name="mixer", mlp_name=["ff1", "ff2"], layers_name="blocks_x"))
    assert rename["mixer"] == "self_attn" and rename["ff1"] == rename["ff2"] == "mlp" and rename["blocks_x"] == "layers"
    exact = get_rename_dict(model=hf)
    assert hf.get_submodule(next(k for k, v in exact.items() if v == "layers")) is hf.transformer.h
    acc = ModuleAccessor(hf, rename_config=RenameConfig(attn_name="attn"), rename={"mlp": "mlp"})
    assert acc.get_attention(1) is hf.transformer.h[1].attn and acc.get_mlp(1) is hf.transformer.h[1].mlp
    assert acc.get_layers() is hf.transformer.h and acc.ln_final is hf.transformer.ln_f
    assert acc.get_embed_tokens() is hf.transformer.wte and acc.get_unembed() is hf.lm_head
    assert acc.get_unembed_norm() is hf.transformer.ln_f

    model = StandardizedTransformer(hf, tokenizer=tok)
    ids = ids_of(tok, PROMPT)
    ref = hf_run(hf, ids)
    with torch.no_grad(), model.trace(ids):
        mlp_out = LayerAccessor(model, "mlp", IOType.OUTPUT)(0).save()
        out = LayerAccessor(model, None, IOType.OUTPUT)[0].save()
    close(out, ref.hidden_states[1])
    seen = []
    hf_run(hf, ids, [(hf.transformer.h[0].mlp, "forward", lambda m, a, o: seen.append(o))])
    close(mlp_out, seen[0])
    assert LayerAccessor(model, "self_attn", None)[0]._module is hf.transformer.h[0].attn
    check_io(model, "gpt2", [])
    check_model_renaming(model, "gpt2", [], allow_dispatch=True)
    model.attention_probabilities.check_source(layer=0, use_trace=True)


# ------------------------------------------------------------------------------------------
# interventions: nnterp's remaining functions and classes
# ------------------------------------------------------------------------------------------


def test_repeat_prompt_and_target_prompt_batch():
    assert repeat_prompt() == TargetPrompt("king king\n1135 1135\nhello hello\n?", -1)  # nnterp's defaults
    assert repeat_prompt(["a", "b"], rel=":", sep=";", placeholder="_", index_to_patch=-2) == TargetPrompt("a:a;b:b;_", -2)
    batch = TargetPromptBatch.from_prompts(["x ?", "y z ?"], [-1, -2])
    assert batch.index_to_patch.tolist() == [-1, -2] and len(batch) == 2
    assert batch[1] == TargetPrompt("y z ?", -2)
    assert list(batch) == [TargetPrompt("x ?", -1), TargetPrompt("y z ?", -2)]
    assert TargetPromptBatch.from_prompts("x ?", -1).prompts == ["x ?"]
    assert TargetPromptBatch.auto(TargetPrompt("q", 0), 3).prompts == ["q"] * 3
    assert TargetPromptBatch.auto(batch, 2) is batch
    assert len(TargetPromptBatch.auto([TargetPrompt("a", 0), TargetPrompt("b", 1)], 2)) == 2
    with pytest.raises(ValueError):
        TargetPromptBatch.auto("a string", 2)
    with pytest.raises(ValueError):
        TargetPromptBatch.from_prompts(["a"], 1.5)


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_patch_object_attn_lens_matches_hooks(model_type):
    model, hf, tok = zoo(model_type)
    attn = [layer.get_submodule(parts_of(model_type)[0]) for layer in hf_layers(hf)]
    n = len(attn)
    src_ids, tgt_ids = ids_of(tok, "The apple"), ids_of(tok, "The pear is red")
    source = []  # attention inputs of the source at its last token, per layer
    hf_run(hf, src_ids, [(a, "pre", hidden_arg_hook(lambda h: source.append(h[0, -1].clone()) or h)) for a in attn])
    for num_patches in (1, 2):
        probs = patch_object_attn_lens(model, "The apple", "The pear is red", attn_idx_patch=1, num_patches=num_patches)
        assert probs.shape == (1, n, model.vocab_size)
        for layer in range(n):
            hooks = [(attn[j], "pre", hidden_arg_hook(set_at(1, source[j]))) for j in range(layer, min(n, layer + num_patches))]
            close(probs[0, layer], hf_run(hf, tgt_ids, hooks).logits[0, -1].softmax(-1))


@torch.no_grad()
def hf_patched_generate(hf, tok, prompt: str, layer_module, position: int, value, max_new: int) -> torch.Tensor:
    """HF greedy generate with the layer's output at ``position`` replaced on the prompt's forward only."""
    ids = ids_of(tok, prompt)

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        if h.shape[1] != ids.shape[1]:
            return None  # a decoding step: the cache already holds the patched prompt
        return replace_output(set_at(position, value))(module, args, output)

    handle = layer_module.register_forward_hook(hook)
    try:
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
    finally:
        handle.remove()


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_patchscope_generate_matches_hf_generate(model_type):
    model, hf, tok = zoo(model_type)
    layers = hf_layers(hf)
    out = patchscope_generate(model, [PROMPT, OTHER], TargetPrompt(TARGET, -1), max_length=4, layers=[1])
    assert list(out) == [1]  # nnterp's index bug (states looked up by layer number) is not reproduced
    for row, prompt in enumerate([PROMPT, OTHER]):
        state = hf_run(hf, ids_of(tok, prompt)).hidden_states[2][0, -1]
        expected = hf_patched_generate(hf, tok, TARGET, layers[1], -1, state, 4)[0].tolist()
        got = out[1][row].tolist()
        if len(expected) < len(got):  # HF stopped this row at EOS; a batched generate pads the finished row
            assert expected[-1] == hf.generation_config.eos_token_id
            assert got[len(expected):] == [hf.generation_config.pad_token_id] * (len(got) - len(expected))
        assert got[:len(expected)] == expected


# ------------------------------------------------------------------------------------------
# prompt_utils
# ------------------------------------------------------------------------------------------


def test_prompt_utils_against_hf():
    model, hf, tok = zoo("llama")

    def first(text):
        return tok(text, add_special_tokens=False)["input_ids"][0]

    assert get_first_tokens(["Paris", "London"], model) == [first("Paris"), first(" Paris"), first("London"),
                                                            first(" London")]
    # a tokenizer that puts a space in front of every text: the no-space token is read after a neutral character
    from tokenizers import pre_tokenizers

    spaced = tiny_model("llama")[1]
    spaced.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    assert spaced("Paris", add_special_tokens=False)["input_ids"][0] == first(" Paris")  # precondition
    assert get_first_tokens("Paris", spaced) == [first("Paris"), first(" Paris")]
    assert get_first_tokens("Paris", tok, use_hacky_implementation=True) == [first("Paris")]
    with pytest.raises(ValueError, match="chat template"):  # the tiny tokenizer (every named type's) has none
        it_repeat_prompt(tok)
    # a tokenizer that ignores spaces and merges the neutral character with the word: no way to isolate it
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    pear = "\U0001f350"
    raw = Tokenizer(models.WordLevel({"Paris": 0, pear: 1, pear + "Paris": 2, "[UNK]": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    merging = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    assert merging("Paris")["input_ids"] == merging(" Paris")["input_ids"] == [0]  # precondition
    with pytest.raises(TokenizationError):
        get_first_tokens("Paris", merging)

    probs = next_token_probs_unsqueeze(model, [PROMPT, OTHER])
    assert probs.shape == (2, 1, model.vocab_size)
    for row, text in enumerate([PROMPT, OTHER]):
        close(probs[row, 0], hf_run(hf, ids_of(tok, text)).logits[0, -1].softmax(-1), atol=1e-4)
    close(compute_next_token_probs(model, PROMPT)[0], probs[0, 0], atol=1e-4)

    prompts = [Prompt.from_strings(PROMPT, {"paris": "Paris", "city": ["London", "Rome"]}, tok),
               Prompt.from_strings(OTHER, {"paris": "Paris", "city": "Rome"}, model)]
    assert prompts[0].has_no_collisions(ignore_targets="city")
    results = run_prompts(model, prompts, batch_size=1, tqdm=None)
    for row, prompt in enumerate(prompts):
        hf_probs = hf_run(hf, ids_of(tok, prompt.prompt)).logits[0, -1].softmax(-1)
        for category, ids in prompt.target_tokens.items():
            assert results[category].shape == (2, 1)
            close(results[category][row, 0], hf_probs[ids].sum(), atol=1e-4)
    lens = run_prompts(model, prompts, get_probs_func=logit_lens, func_kwargs={"return_inv_logits": False})
    assert lens["paris"].shape == (2, model.num_layers)
    close(lens["paris"][:, -1], results["paris"][:, 0], atol=1e-4)
    single = prompts[0].run(model, logit_lens)
    close(single["city"], lens["city"][:1], atol=1e-5)
    layer1 = prompts[0].get_target_probs(logit_lens(model, PROMPT), layer=1)
    close(layer1["paris"], lens["paris"][:1, 1], atol=1e-5)


def test_display_names(tmp_path):
    pytest.importorskip("plotly")
    from unilens.ui.display import plot_topk_tokens, prompts_to_df

    _, _, tok = zoo("llama")
    probs = torch.softmax(torch.randn(3, 512, generator=torch.Generator().manual_seed(1)), -1)
    fig = plot_topk_tokens(probs, tok, k=2, use_token_ids=True, file=tmp_path / "top.html", save_html=True)
    expected = probs.topk(2, dim=-1).indices  # oracle: torch's topk
    assert [list(r) for r in fig.data[0].text] == [[str(i) for i in row] for row in expected.tolist()]
    assert (tmp_path / "top.html").exists()
    assert plot_topk_tokens(probs[0], tok).data[0].z is not None  # (vocab,), as nnterp takes it
    df = prompts_to_df([Prompt.from_strings(PROMPT, {"paris": "Paris"}, tok)])
    assert df[0]["prompt"] == PROMPT and df[0]["paris_string"] == "Paris"


# ------------------------------------------------------------------------------------------
# SmolLM2: the real model
# ------------------------------------------------------------------------------------------


def test_smollm2_nnterp_surface(smol):
    model, hf, tok = smol
    ids = ids_of(tok, PROMPT)
    ref = hf_run(hf, ids)
    hs, layers = ref.hidden_states, hf.model.layers

    # nnsight_utils: reads and sets
    box = {}  # built outside the trace: only saved values and outside containers come back
    with torch.no_grad(), model.trace(ids):
        attn = get_attention_output(model, 10).save()
        mlp = get_mlp_output(model, 10).save()
        mid = get_layer_output(model, 10).save()
        set_layer_output(model, 12, get_layer_output(model, 12) * 1.5)
        logits = model.logits.save()
        box["size"] = tuple(model.input_size)
    close(mid, hs[11], atol=1e-4)
    close(hs[10] + attn + mlp, hs[11], atol=1e-4)  # pre-norm block: residual + attention + MLP
    scaled = hf_run(hf, ids, [(layers[12], "forward", replace_output(lambda h: h * 1.5))]).logits
    close(logits, scaled, atol=1e-4)
    assert box["size"] == tuple(ids.shape)
    acts = collect_token_activations_batched(model, [PROMPT, OTHER, "Hi"], batch_size=2, layers=[5])
    session = collect_last_token_activations_session(model, [PROMPT, OTHER, "Hi"], batch_size=2, layers=[5])
    assert acts.shape == (1, 3, model.hidden_size)
    close(acts[0, 0], hs[6][0, -1], atol=1e-4)
    close(session, acts, atol=1e-6)
    with torch.no_grad(), model.trace(ids):
        lens = project_on_vocab(model, get_layer_output(model, 29)).save()
    close(lens, ref.logits, atol=1e-4)
    assert get_unembed_norm(model)._module is hf.model.norm

    # StandardizedTransformer's nnterp members
    h = hs[20][0, -1]
    top = model.get_topk_closest_tokens(hidden_state=h, k=3)
    with torch.no_grad():
        oracle = hf.lm_head(hf.model.norm(h)).softmax(-1).topk(3)
    assert list(top) == tok.convert_ids_to_tokens(oracle.indices.tolist())
    assert list(top.values()) == pytest.approx(oracle.values.tolist(), abs=1e-5)
    assert len(model.get_topk_closest_tokens(hs[20][0, -2:], k=2)) == 2
    assert model.probs_to_dict(oracle.indices, oracle.values) == top
    assert model.detect_layer_output_type() is None
    assert model.add_prefix_false_tokenizer("Paris").input_ids == tok("Paris").input_ids

    embeds = hf.get_input_embeddings()(ids) * 0.5
    with torch.no_grad(), model.trace(ids):
        model.token_embeddings = model.token_embeddings * 0.5
        skipped = model.logits.save()
    close(skipped, hf(inputs_embeds=embeds).logits, atol=1e-4)
    with torch.no_grad(), model.trace(ids):
        model.skip_layers(3, 5)
        skip_logits = model.logits.save()
    identity = [(layers[i], "forward", replace_output(lambda h, i=i: keep[3])) for i in range(3, 6)]
    keep = {}
    grab = (layers[3], "pre", lambda m, a, k: keep.__setitem__(3, (a[0] if a else k["hidden_states"]).clone()))
    close(skip_logits, hf_run(hf, ids, [grab] + identity).logits, atol=1e-4)
    check_steer(model, hf, ids, layers, 8, ref)

    # interventions on the real model
    chat_kinds = [(True, True), (True, False), (False, True), (False, False)]
    for add_user_instr, use_system_prompt in chat_kinds:
        target = it_repeat_prompt(tok, words=["cat"], add_user_instr=add_user_instr, use_system_prompt=use_system_prompt,
                                  complete_prompt=False)
        inner = "cat cat\n?"
        if add_user_instr:
            chat = ([{"role": "system", "content": "You are a helpful assistant."}] if use_system_prompt else []) + [
                {"role": "user", "content": "I will provide you with a series of sentences. Your task is to guess the "
                 "next word in the sentence. You must answer with the next word only."},
                {"role": "assistant", "content": "Ok."}, {"role": "user", "content": inner}]
        elif use_system_prompt:
            chat = [{"role": "system", "content": "The user will provide you with a sentence. Your task is to guess the "
                     "next word in the sentence. You must answer with the next word only."},
                    {"role": "user", "content": inner}]
        else:
            chat = [{"role": "user", "content": "Guess the next word in the following sentence (answer only the next "
                     f"word): {inner}"}]
        chat.append({"role": "assistant", "content": ""})
        assert target == TargetPrompt(tok.apply_chat_template(chat, tokenize=False, continue_final_message=True), -1)
    assert it_repeat_prompt(tok).prompt.endswith("king king\n1135 1135\nhello hello\n?")

    out = patchscope_generate(model, PROMPT, repeat_prompt(), max_length=3, layers=[4, 20])
    for layer in (4, 20):
        expected = hf_patched_generate(hf, tok, repeat_prompt().prompt, layers[layer], -1, hs[layer + 1][0, -1], 3)
        assert out[layer].tolist() == expected.tolist()


def test_smollm2_lenses_and_interventions(smol):
    """The lenses, patching functions and batched helpers on the real model, against HF runs with torch hooks."""
    model, hf, tok = smol
    layers = hf.model.layers
    n = len(layers)
    ids = ids_of(tok, PROMPT)
    ref = hf_run(hf, ids)
    hs = ref.hidden_states
    prompts = [PROMPT, "Hi there"]
    single = [hf_run(hf, ids_of(tok, p)) for p in prompts]

    with torch.no_grad(), model.trace(ids):
        x0 = get_layer_input(model, 0).save()
        next_probs = get_next_token_probs(model).save()
    close(x0, hs[0])
    close(next_probs, ref.logits[:, -1].softmax(-1), atol=1e-4)
    lens = logit_lens(model, PROMPT)
    for i in (3, n - 1):
        logits = ref.logits[0, -1] if i == n - 1 else hf_run(
            hf, ids, [(layers[-1], "forward", replace_output(lambda h, i=i: hs[i + 1]))]).logits[0, -1]
        close(lens[0, i], logits.softmax(-1), atol=1e-4)
    probs = compute_next_token_probs(model, prompts)
    unsq = next_token_probs_unsqueeze(model, prompts)
    for row, r in enumerate(single):
        close(probs[row], r.logits[0, -1].softmax(-1), atol=1e-4)
        close(unsq[row, 0], r.logits[0, -1].softmax(-1), atol=1e-4)
    acts = get_token_activations(model, prompts, layers=[7], get_activations=get_attention_output, idx=-2)
    for row, p in enumerate(prompts):
        grabbed = []
        hf_run(hf, ids_of(tok, p), [(layers[7].self_attn, "forward", lambda m, a, o: grabbed.append(o[0].clone()))])
        close(acts[0, row], grabbed[0][0, -2], atol=1e-4)
    with torch.no_grad(), model.trace(ids):
        attn = LayerAccessor(model, "self_attn", IOType.OUTPUT)(7).save()
    grabbed = []
    hf_run(hf, ids, [(layers[7].self_attn, "forward", lambda m, a, o: grabbed.append(o[0].clone()))])
    close(attn, grabbed[0], atol=1e-4)

    scope = patchscope_lens(model, prompts, repeat_prompt(), layers=[4, 20])
    target_ids = ids_of(tok, repeat_prompt().prompt)
    for row, r in enumerate(single):
        for k, layer in enumerate((4, 20)):
            patched = hf_run(hf, target_ids, [(layers[layer], "forward",
                                               replace_output(set_at(-1, r.hidden_states[layer + 1][0, -1])))])
            close(scope[row, k], patched.logits[0, -1].softmax(-1), atol=1e-4)

    attn_mods = [layer.self_attn for layer in layers]
    source = []
    hf_run(hf, ids_of(tok, "The apple"), [(a, "pre", hidden_arg_hook(lambda h: source.append(h[0, -1].clone()) or h))
                                          for a in attn_mods])
    object_lens = patch_object_attn_lens(model, "The apple", "The pear is red", attn_idx_patch=1, num_patches=2)
    tgt = ids_of(tok, "The pear is red")
    for layer in (0, 14, n - 1):
        hooks = [(attn_mods[j], "pre", hidden_arg_hook(set_at(1, source[j]))) for j in range(layer, min(n, layer + 2))]
        close(object_lens[0, layer], hf_run(hf, tgt, hooks).logits[0, -1].softmax(-1), atol=1e-4)

    targets = [Prompt.from_strings(p, {"paris": "Paris", "other": ["London", "Rome"]}, model) for p in prompts]
    results = run_prompts(model, targets, batch_size=2, tqdm=None)
    for row, prompt in enumerate(targets):
        for category, target_ids in prompt.target_tokens.items():
            close(results[category][row, 0], single[row].logits[0, -1].softmax(-1)[target_ids].sum(), atol=1e-4)


# ------------------------------------------------------------------------------------------
# nnterp bugs not reproduced (docs/coming-from-nnterp.md)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["dbrx", "llama", "qwen2_moe"])
def test_attention_output_excludes_the_residual(model_type):
    """layer output = layer input + attention output + MLP output (hand-built sum); nnterp's DBRX attention output
    is its norm_attn_norm block's, which already holds the residual."""
    model, hf, tok = zoo(model_type)
    with torch.no_grad(), model.trace(PROMPT):
        x = get_layer_input(model, 1).save()
        attn = get_attention_output(model, 1).save()
        mlp = get_mlp_output(model, 1).save()
        out = get_layer_output(model, 1).save()
    close(x + attn + mlp, out)
    assert (attn - out).abs().max() > 1e-3 * out.abs().max()


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_right_padding_reads_the_last_real_token(model_type):
    """nnterp's next_token_probs / logit_lens read the last position (a pad) under right padding, or raise."""
    hf, tok = tiny_model(model_type)
    model = StandardizedTransformer(hf, tokenizer=tok, tokenizer_kwargs={"padding_side": "right"}, check=False)
    lens = logit_lens(model, [PROMPT, "Hi"])
    probs = compute_next_token_probs(model, [PROMPT, "Hi"])
    acts = get_token_activations(model, [PROMPT, "Hi"], layers=[0])
    for row, text in enumerate([PROMPT, "Hi"]):
        ref = hf_run(hf, ids_of(tok, text))
        expected = ref.logits[0, -1].softmax(-1)
        close(lens[row, -1], expected, atol=1e-4)
        close(probs[row], expected, atol=1e-4)
        close(acts[0, row], ref.hidden_states[1][0, -1], atol=1e-4)


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_reads_sets_and_members(model_type):
    """nnsight_utils' reads and sets, StandardizedTransformer's nnterp members, prompt_utils' model functions and
    rename_utils' helpers, on every named type: each against HF's forward, torch hooks on HF's modules or HF's config."""
    model, hf, tok = zoo(model_type)
    ids = ids_of(tok, PROMPT)
    ref = hf_run(hf, ids)
    hs, n = ref.hidden_states, len(ref.hidden_states) - 1
    layers = hf_layers(hf)
    attn_name, mlp_name = parts_of(model_type)

    # attention / MLP outputs: the HF modules' own outputs (torch hooks); OPT has no MLP module (fc1 -> fc2 inside
    # its layer), so its MLP output is the hand-built rest of its sequential block: output - input - attention
    with torch.no_grad(), model.trace(ids):
        x = get_layer_input(model, 1).save()
        attn = get_attention_output(model, 1).save()
        mlp = get_mlp_output(model, 1).save()
        out = get_layer_output(model, 1).save()
    first = lambda o: (o[0] if isinstance(o, tuple) else o).clone()  # noqa: E731  (Falcon adds to it in place)
    seen = {}
    hf_run(hf, ids, [(layers[1].get_submodule(name), "forward", lambda m, a, o, key=key: seen.__setitem__(key, first(o)))
                     for key, name in (("attn", attn_name), ("mlp", mlp_name)) if name is not None])
    close(x, hs[1])
    if model_type == "bloom":  # Bloom's attention and MLP modules add the residual they are given inside
        seen = {"attn": seen["attn"] - x, "mlp": seen["mlp"] - seen["attn"]}  # the MLP's residual: x + attention
    close(attn, seen["attn"])
    close(mlp, seen["mlp"] if mlp_name is not None else out - x - attn, atol=1e-4)
    assert attn.abs().max() > 0 and mlp.abs().max() > 0

    # set_layer_output / project_on_vocab / token_embeddings (settable) / skip_layers / steer vs HF hooks and inputs
    with torch.no_grad(), model.trace(ids):
        set_layer_output(model, 0, get_layer_output(model, 0) * 1.5)
        scaled = get_logits(model).save()
    close(scaled, hf_run(hf, ids, [(layers[0], "forward", replace_output(lambda h: h * 1.5))]).logits, atol=1e-4)
    with torch.no_grad(), model.trace(ids):
        lens = project_on_vocab(model, get_layer_output(model, n - 1)).save()
    close(lens, ref.logits, atol=1e-4)
    with torch.no_grad(), model.trace(ids):
        model.token_embeddings = model.token_embeddings * 0.5
        halved = model.logits.save()
    with torch.no_grad():
        close(halved, hf(inputs_embeds=hf.get_input_embeddings()(ids) * 0.5).logits, atol=1e-4)
    with torch.no_grad(), model.trace(ids):
        model.skip_layers(0, 0)
        skipped = model.logits.save()
    close(skipped, hf_run(hf, ids, [(layers[0], "forward", replace_output(lambda h: hs[0]))]).logits, atol=1e-4)
    with torch.no_grad(), model.trace(ids):
        model.skip_layer(1)
        skipped = model.logits.save()
    close(skipped, hf_run(hf, ids, [(layers[1], "forward", replace_output(lambda h: hs[1]))]).logits, atol=1e-4)
    check_steer(model, hf, ids, layers, 0, ref)

    # get_unembed_norm is the norm whose output HF's unembedding reads
    seen = {}
    hf_run(hf, ids, [(get_unembed_norm(model)._module, "forward", lambda m, a, o: seen.__setitem__("norm", o)),
                     (hf.get_output_embeddings(), "pre", lambda m, a, k: seen.__setitem__("head", a[0] if a else
                                                                                           k["input"]))])
    close(seen["norm"], seen["head"])

    # get_topk_closest_tokens / probs_to_dict: HF's prediction when its last layer outputs the state
    state = hs[1][0, -1]
    with torch.no_grad():
        oracle = hf_run(hf, ids, [(layers[-1], "forward", replace_output(lambda h: state.expand_as(h)))]).logits[0, -1]
    oracle = oracle.softmax(-1).topk(3)
    top = model.get_topk_closest_tokens(hidden_state=state, k=3)
    # {token string: probability}; ids past the tokenizer's vocabulary are None and collapse, as in nnterp's dict
    assert top == pytest.approx(dict(zip(tok.convert_ids_to_tokens(oracle.indices.tolist()), oracle.values.tolist())),
                                abs=1e-5)
    assert model.probs_to_dict(oracle.indices, oracle.values) == pytest.approx(top, abs=1e-6)

    # batched, padded reads: each prompt's last real token vs one HF run per prompt
    prompts = [PROMPT, OTHER, "Hi"]
    single = [hf_run(hf, ids_of(tok, p)) for p in prompts]
    last_out = []  # the last layer's own output (HF's last hidden state may already be normed)
    for p in prompts:
        hf_run(hf, ids_of(tok, p), [(layers[1], "forward", lambda m, a, o: last_out.append(o[0] if isinstance(o, tuple)
                                                                                           else o))])
    acts = collect_token_activations_batched(model, prompts, batch_size=2, layers=[1, 0])
    session = collect_last_token_activations_session(model, prompts, batch_size=2, layers=[0])
    assert acts.shape == (2, 3, model.hidden_size) and session.shape == (1, 3, model.hidden_size)
    for row, r in enumerate(single):
        close(acts[0, row], last_out[row][0, -1], atol=1e-4)
        close(acts[1, row], r.hidden_states[1][0, -1], atol=1e-4)
        close(session[0, row], r.hidden_states[1][0, -1], atol=1e-4)
    # get_token_activations with idx= and get_activations= (the attention output, HF's module output by hook)
    attn_acts = get_token_activations(model, prompts, layers=[0], get_activations=get_attention_output, idx=-2)
    for row, p in enumerate(prompts):
        grabbed = []
        hf_run(hf, ids_of(tok, p), [(layers[0].get_submodule(attn_name), "forward",
                                     lambda m, a, o: grabbed.append((o[0] if isinstance(o, tuple) else o).clone()))])
        expected = grabbed[0][0, -2] - (single[row].hidden_states[0][0, -2] if model_type == "bloom" else 0)
        close(attn_acts[0, row], expected, atol=1e-4)
    # patchscope_lens with latents= (no source run), nnterp's layout (layers, n_sources, hidden): the latent
    # written into the target at its last token
    latents = torch.randn(1, 2, model.hidden_size, generator=torch.Generator().manual_seed(1))
    scope = patchscope_lens(model, target_patch_prompts=TargetPrompt(TARGET, -1), layers=[0], latents=latents)
    for row in range(2):
        patched = hf_run(hf, ids_of(tok, TARGET), [(layers[0], "forward", replace_output(set_at(-1, latents[0, row])))])
        close(scope[row, 0], patched.logits[0, -1].softmax(-1), atol=1e-5)
    probs = next_token_probs_unsqueeze(model, prompts)
    next_probs = compute_next_token_probs(model, prompts)
    assert probs.shape == (3, 1, model.vocab_size)
    for row, r in enumerate(single):
        close(probs[row, 0], r.logits[0, -1].softmax(-1), atol=1e-4)
        close(next_probs[row], r.logits[0, -1].softmax(-1), atol=1e-4)
    targets = [Prompt.from_strings(p, {"a": "Paris", "b": ["London", "Rome"]}, tok) for p in prompts[:2]]
    results = run_prompts(model, targets, batch_size=2, tqdm=None)
    for row, prompt in enumerate(targets):
        for category, target_ids in prompt.target_tokens.items():
            close(results[category][row, 0], single[row].logits[0, -1].softmax(-1)[target_ids].sum(), atol=1e-4)

    # rename_utils helpers against HF's config and modules
    cfg = hf.config.get_text_config()
    assert get_num_attention_heads(hf) == cfg.num_attention_heads
    assert get_hidden_size(hf) == cfg.hidden_size and get_vocab_size(hf) == cfg.vocab_size
    exact = get_rename_dict(model=hf)
    assert hf.get_submodule(next(k for k, v in exact.items() if v == "layers")) is layers
    acc = ModuleAccessor(hf)
    assert acc.get_layers() is layers and acc.get_attention(0) is layers[0].get_submodule(attn_name)
    assert acc.get_embed_tokens() is hf.get_input_embeddings() and acc.get_unembed() is hf.get_output_embeddings()
    with torch.no_grad(), model.trace(ids):
        attn_out = LayerAccessor(model, "self_attn", IOType.OUTPUT)(1).save()
        layer_out = LayerAccessor(model, None, IOType.OUTPUT)[1].save()
    close(layer_out, last_out[0])
    close(attn_out, attn)
    check_io(model, model_type, [])
    check_model_renaming(model, model_type, [], allow_dispatch=True)
    model.attention_probabilities.check_source(layer=0, use_trace=True)


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_attention_functions_refused_without_attention(model_type):
    """A model whose attention accessors are dropped (ignore_attn): attention-only functions refuse, naming why."""
    model = StandardizedTransformer(*tiny_model(model_type), rename_config=RenameConfig(ignore_attn=True))
    with pytest.raises(ValueError, match="have no attention"):
        patch_object_attn_lens(model, "The apple", "The pear is red", attn_idx_patch=1, num_patches=1)
    with pytest.raises(RenamingError, match="no attention|no softmax attention"):
        model.attention_probabilities.check_source()


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_rename_config_structure_names(model_type):
    """RenameConfig's layers_name / ln_final_name / lm_head_name / model_name, given HF's own names (found here from
    HF: the stack, get_output_embeddings(), base_model_prefix, and the norm whose output HF's unembedding reads)."""
    hf, tok = tiny_model(model_type)
    ids = ids_of(tok, PROMPT)
    names = {id(m): name for name, m in hf.named_modules()}
    stack, head = hf_layers(hf), hf.get_output_embeddings()
    inside = {id(m) for m in stack.modules()}
    norms = [m for m in hf.modules() if id(m) not in inside and "norm" in type(m).__name__.lower()]
    seen, outs = {}, {}
    hooks = [(m, "forward", lambda mod, a, o, k=id(m): outs.__setitem__(k, o)) for m in norms]
    hooks.append((head, "pre", lambda mod, a, k: seen.__setitem__("head", a[0] if a else k["input"])))
    ref = hf_run(hf, ids, hooks)
    final = [m for m in norms if id(m) in outs and torch.equal(outs[id(m)], seen["head"])]
    assert len(final) == 1
    prefix = hf.base_model_prefix
    model = StandardizedTransformer(hf, tokenizer=tok, rename_config=RenameConfig(
        layers_name=names[id(stack)], ln_final_name=names[id(final[0])], lm_head_name=["no_head", names[id(head)]],
        model_name=prefix))
    assert model.layers._module is stack and model.ln_final._module is final[0] and model.lm_head._module is head
    assert model.model._module is getattr(hf, prefix)
    with torch.no_grad(), model.trace(ids):
        logits = model.logits.save()
    close(logits, ref.logits)
