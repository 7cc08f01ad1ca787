"""Models dispatched by accelerate with layers offloaded to disk (``device_map`` + ``offload_folder``).

Oracle: the same checkpoint loaded fully in memory (itself checked against HF at load time, and every accessor
checked against HF / plain torch hooks elsewhere in the suite). Offloaded weights are the checkpoint's bytes and the
CPU kernels are the same, so every value must be EXACTLY equal (``torch.equal``), not merely close.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from unilens import StandardizedTransformer
from unilens.arch.discovery import Architecture
from unilens.arch.offload import (
    OffloadError,
    detached_copy,
    offloaded_parameter_names,
    parameter,
)
from unilens.testing import tiny_model

# Every standardized tensor of the README's list, read through `model.read` (names in any order).
TENSORS = [
    "layers_input", "layers_output", "attentions_input", "attentions_output", "mlps_input", "mlps_output",
    "attention_probabilities", "attention_scores", "attention_queries", "attention_keys", "attention_values",
    "attention_heads", "attention_head_results",
]  # fmt: skip
WEIGHTS = ["W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"]
TEXTS = ["The capital of France is", "A cat sat", "one two three four five six"]


def _device_map(hf: nn.Module, disk: set[str]) -> dict[str, str]:
    """Every layer of the decoder stack and every other top-level part -> "disk" if named in ``disk`` else "cpu"."""
    layers_path = Architecture.from_model(hf).layers_path
    out: dict[str, str] = {}

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = prefix + name
            if full == layers_path:
                for i in range(len(child)):
                    out[f"{full}.{i}"] = "disk" if f"{full}.{i}" in disk else "cpu"
            elif layers_path.startswith(full + "."):
                visit(full + ".", child)
            else:
                out[full] = "disk" if full in disk else "cpu"

    visit("", hf)
    return out


def _pair(model_type: str, tmp: Path, disk_layers: list[int], disk_parts: tuple[str, ...]):
    hf, tok = tiny_model(model_type)
    hf.save_pretrained(tmp / "ckpt")
    tok.save_pretrained(tmp / "ckpt")
    layers_path = Architecture.from_model(hf).layers_path
    disk = {f"{layers_path}.{i}" for i in disk_layers} | set(disk_parts)
    ref = StandardizedTransformer(str(tmp / "ckpt"), dtype=torch.float32)
    off = StandardizedTransformer(  # load-time validation runs on the offloaded model (check=True by default)
        str(tmp / "ckpt"), dtype=torch.float32, device_map=_device_map(hf, disk), offload_folder=str(tmp / "offload")
    )
    return ref, off


def _assert_same(a, b, what: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_same(a[k], b[k], f"{what}[{k}]")
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{what}[{i}]")
        return
    if isinstance(a, torch.Tensor):
        assert a.device.type != "meta" and b.device.type != "meta", f"{what}: meta tensor"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
        diff = float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0
        assert torch.equal(a, b), f"{what}: max abs difference {diff:.3g}"
        return
    assert a == b, f"{what}: {a!r} vs {b!r}"


def _check_everything(ref: StandardizedTransformer, off: StandardizedTransformer) -> None:
    from unilens.analysis.attribution import direct_logit_attribution
    from unilens.analysis.lens import logit_lens
    from unilens.analysis.patching import activation_patching, attribution_patching

    hf_off = off.module_accessor.model
    offloaded = offloaded_parameter_names(hf_off)
    assert offloaded, "the device map offloaded nothing: the test would not test offloading"
    n = ref.num_layers
    attn_layers = [i for i in range(n) if ref._attention_modules[i] is not None]

    # facts
    for fact in ("num_layers", "num_heads", "num_kv_heads", "hidden_size", "head_dim", "vocab_size"):
        assert getattr(off, fact) == getattr(ref, fact), fact

    # every standardized tensor, every layer, padded batch (model.read: one forward)
    names = [f"{t}.*" for t in TENSORS] + ["token_embeddings", "logits", "next_token_probs"]
    _assert_same(ref.read(TEXTS, names), off.read(TEXTS, names), "read")

    # modules' outputs, helpers and assignments inside a trace
    def traced(model):
        out = {}
        with model.trace(TEXTS[0]):
            out["emb"] = model.embed_tokens.output.save()
            model.layers_output[0] = model.layers_output[0] * 0.5  # an assignment flows on
            out["attn"] = model.attentions[n - 1].output[0].save() if isinstance(
                model.attentions[n - 1].output, tuple) else model.attentions[n - 1].output.save()
            out["lens"] = model.project_on_vocab(model.layers_output[n - 1]).save()
            out["ln"] = model.ln_final.output.save()
            out["head"] = model.lm_head.output.save()
        with model.trace(TEXTS[1]):
            model.skip_layer(n - 1)
            out["skipped"] = model.logits.save()
        with model.trace(TEXTS[1]):
            model.steer(layers=[n - 1], steering_vector=torch.ones(model.hidden_size), factor=2.0)
            out["steered"] = model.logits.save()
        return out

    _assert_same(traced(ref), traced(off), "trace")
    from unilens.compat.nnsight_utils import (
        compute_next_token_probs,
        get_token_activations,
    )

    _assert_same(get_token_activations(ref, TEXTS), get_token_activations(off, TEXTS), "get_token_activations")
    _assert_same(compute_next_token_probs(ref, TEXTS), compute_next_token_probs(off, TEXTS), "next_token_probs")

    # weight views: real tensors, never meta
    for i in attn_layers:
        for w in WEIGHTS:
            _assert_same(getattr(ref.weights[i], w), getattr(off.weights[i], w), f"weights[{i}].{w}")
    _assert_same(ref.weights.W_U, off.weights.W_U, "W_U")
    _assert_same(ref.weights.W_E, off.weights.W_E, "W_E")

    # interventions
    _assert_same(logit_lens(ref, TEXTS), logit_lens(off, TEXTS), "logit_lens")
    token = ref.tokenizer(" Paris").input_ids[-1]

    def metric(logits):
        return logits[:, -1, token]

    clean, corrupted = "The capital of France is", "The capital of Italy is"
    for kwargs in ({}, {"metric_positions": -1}, {"component": "attn"}):
        _assert_same(
            activation_patching(ref, clean, corrupted, metric, progress=False, **kwargs),
            activation_patching(off, clean, corrupted, metric, progress=False, **kwargs),
            f"activation_patching {kwargs}",
        )
    _assert_same(
        attribution_patching(ref, clean, corrupted, metric), attribution_patching(off, clean, corrupted, metric),
        "attribution_patching",
    )
    _assert_same(direct_logit_attribution(ref, clean, token), direct_logit_attribution(off, clean, token), "DLA")


def _check_generation(ref, off) -> None:
    from unilens.analysis.generation import generate

    def run(model):
        out = generate(model, TEXTS[:2], max_new_tokens=3, capture=["layers_output.0", "attention_probabilities.0"],
                       logit_lens=True)
        return out.tokens, out.steps, out.lens

    _assert_same(run(ref), run(off), "generate")


def _check_cache(ref, off, tmp: Path, names=("layers_output.*", "attention_probabilities.0", "logits")) -> None:
    from unilens.scale.store import ActivationStore, cache_activations

    names = list(names)
    a = cache_activations(ref, TEXTS, names, tmp / "ref_store", batch_size=2, progress=False)
    b = cache_activations(off, TEXTS, names, tmp / "off_store", batch_size=2, progress=False)
    assert a.manifest["model"] == b.manifest["model"]  # same identity (weights fingerprint read from the offload map)
    for name in ActivationStore(tmp / "ref_store").names:
        _assert_same(a[name], b[name], f"cache {name}")


@pytest.mark.parametrize(
    "model_type, disk_layers, disk_parts",
    [
        ("llama", [1], ("lm_head",)),  # separate q/k/v, RMSNorm, lm_head on disk
        # Conv1D + fused c_attn + biases; the embedding on disk (tied to lm_head: accelerate wants both on one device)
        ("gpt2", [0], ("transformer.wte", "lm_head", "transformer.ln_f")),
    ],
)
def test_offloaded_tiny_equals_in_memory(model_type, disk_layers, disk_parts, tmp_path):
    ref, off = _pair(model_type, tmp_path, disk_layers, disk_parts)
    assert any(p.startswith(Architecture.from_model(off.module_accessor.model).layers_path)
               for p in offloaded_parameter_names(off.module_accessor.model))
    _check_everything(ref, off)
    _check_generation(ref, off)
    _check_cache(ref, off, tmp_path)


@pytest.mark.slow
def test_offloaded_smollm2_equals_in_memory(tmp_path):
    from unilens import load_default
    from unilens.analysis.lens import logit_lens
    from unilens.analysis.patching import activation_patching
    from unilens.arch.loading import default_model_path

    ref = load_default()
    hf = ref.module_accessor.model
    # the embedding is tied to lm_head: accelerate needs tied weights on one device, so both go to disk together
    disk = {f"model.layers.{i}" for i in range(20, 30)} | {"model.embed_tokens", "lm_head"}
    start = time.perf_counter()
    off = StandardizedTransformer(  # through the GGUF path: its cached safetensors copy, dispatched
        default_model_path(), device_map=_device_map(hf, disk), offload_folder=str(tmp_path / "offload")
    )
    print(f"offloaded load + validation: {time.perf_counter() - start:.2f} s")
    names = offloaded_parameter_names(off.module_accessor.model)
    assert any(".layers.25." in p for p in names) and not any(".layers.5." in p for p in names)

    text = "The capital of France is"
    names = ["layers_output.*", "attention_probabilities.12", "attention_probabilities.25", "attention_head_results.27",
             "mlps_output.29", "next_token_probs"]
    got, want = off.read(text, names), ref.read(text, names)
    _assert_same(want, got, "read")
    paris = ref.tokenizer(" Paris").input_ids[0]
    assert int(got["next_token_probs"][0].argmax()) == paris
    for i in (0, 25, 29):
        for w in WEIGHTS:
            _assert_same(getattr(ref.weights[i], w), getattr(off.weights[i], w), f"weights[{i}].{w}")
    _assert_same(ref.weights.W_U, off.weights.W_U, "W_U")
    _assert_same(logit_lens(ref, [text]), logit_lens(off, [text]), "logit_lens")

    def metric(logits):
        return logits[:, -1, paris]

    _assert_same(
        activation_patching(ref, text, "The capital of Italy is", metric, layers=[0, 24, 29], metric_positions=-1,
                            progress=False),
        activation_patching(off, text, "The capital of Italy is", metric, layers=[0, 24, 29], metric_positions=-1,
                            progress=False),
        "activation_patching",
    )
    _check_cache(ref, off, tmp_path, names=["layers_output.5", "layers_output.25", "attention_probabilities.25",
                                            "logits"])  # overhead per forward: bench/offload_overhead.py


def test_meta_weights_without_offload_map_are_refused():
    lin = nn.Linear(3, 4, device="meta")
    with pytest.raises(OffloadError, match="offload_folder"):
        parameter(lin, "weight")


def test_detached_copy_loads_offloaded_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    hf, _ = tiny_model("llama")
    hf.save_pretrained(tmp_path)
    off = AutoModelForCausalLM.from_pretrained(
        tmp_path, device_map=_device_map(hf, {"model.layers.1", "model.norm"}), offload_folder=str(tmp_path / "off")
    )
    assert off.model.norm.weight.device.type == "meta"
    copy = detached_copy(off.model.norm)
    assert not hasattr(copy, "_hf_hook") and off.model.norm._hf_hook is not None
    x = torch.randn(2, hf.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(copy(x), hf.model.norm(x))
        assert torch.equal(off.model.norm(x), hf.model.norm(x))  # the original still runs through its hook


def test_auto_device_map_with_max_memory_offloads_and_matches(tmp_path):
    """The usual way to offload: ``device_map="auto"`` with a ``max_memory`` budget smaller than the model."""
    hf, tok = tiny_model("llama")
    hf.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    size = sum(p.numel() * p.element_size() for p in hf.parameters())
    ref = StandardizedTransformer(str(tmp_path / "ckpt"), dtype=torch.float32)
    off = StandardizedTransformer(str(tmp_path / "ckpt"), dtype=torch.float32, device_map="auto",
                                  max_memory={"cpu": size // 2}, offload_folder=str(tmp_path / "offload"))
    device_map = off.module_accessor.model.hf_device_map
    assert "disk" in device_map.values() and "cpu" in device_map.values(), device_map
    names = [f"{t}.*" for t in TENSORS] + ["logits"]
    _assert_same(ref.read(TEXTS, names), off.read(TEXTS, names), "read")
    for w in WEIGHTS:
        _assert_same(getattr(ref.weights[-1], w), getattr(off.weights[-1], w), f"weights[-1].{w}")


def test_cpu_offload_hooks_equal_in_memory(tmp_path):
    """accelerate's other offload flavour: every weight kept in a CPU map (``accelerate.cpu_offload``, what a
    ``device_map`` "cpu" entry becomes beside a GPU), all parameters on meta between forwards."""
    import copy

    from accelerate import cpu_offload

    hf, tok = tiny_model("llama")
    offloaded_hf = cpu_offload(copy.deepcopy(hf), execution_device=torch.device("cpu"))
    ref = StandardizedTransformer(hf, tokenizer=tok)
    assert all(p.device.type == "meta" for p in offloaded_hf.parameters())
    off = StandardizedTransformer(offloaded_hf, tokenizer=tok)
    _check_everything(ref, off)
    _check_generation(ref, off)
    _check_cache(ref, off, tmp_path)


def test_tied_weights_split_across_devices_get_a_clear_error(tmp_path):
    hf, tok = tiny_model("gpt2")  # lm_head is tied to transformer.wte
    assert hf.config.tie_word_embeddings
    hf.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    for disk in ({"transformer.wte"}, {"lm_head"}):  # refused while loading (accelerate) / after it (unilens)
        with pytest.raises((ValueError, OffloadError), match="tied to each other.*same"):
            StandardizedTransformer(str(tmp_path / "ckpt"), device_map=_device_map(hf, disk | {"transformer.h.1"}),
                                    offload_folder=str(tmp_path / "offload"))
