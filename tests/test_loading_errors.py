"""Loading refuses a partly random model and names the damaged file: a config naming more layers than the weights
hold (folder and GGUF), truncated safetensors / GGUF files, a config.json that is not JSON, a folder without tokenizer
files, a sharded checkpoint missing a shard. Each broken folder is built from a tiny zoo model in tmp_path; the
oracle for "correct use still loads" is transformers' own load report (no missing keys) on every zoo type."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import gguf
import pytest
import torch

from unilens import StandardizedTransformer
from unilens.arch.loading import (
    MissingTokenizerError,
    MissingWeightsError,
    ModelFileError,
    gguf_cache_dir,
    load_hf_model,
)
from unilens.testing import ZOO_REQUIRED, tiny_model


@pytest.fixture(autouse=True)
def _private_gguf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNILENS_CACHE", str(tmp_path / "cache"))  # GGUF conversions never touch ~/.cache


def saved(folder: Path, model_type: str = "llama", **overrides) -> Path:
    hf, tok = tiny_model(model_type, **overrides)
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------------
# A tiny llama GGUF file written with the gguf package (F32 tensors, the zoo's byte-level BPE tokenizer)
# ------------------------------------------------------------------------------------------

_GGUF_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def write_tiny_gguf(path: Path, extra_blocks: int = 0) -> Path:
    """The zoo's tiny llama as a GGUF file whose metadata names ``extra_blocks`` more layers than it has tensors."""
    hf, tok = tiny_model("llama")
    cfg = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers + extra_blocks)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    bpe = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda kv: kv[1])]
    tokens += [f"[unused{i}]" for i in range(cfg.vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i < 4 else gguf.TokenType.NORMAL for i in range(len(tokens))])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(tok.bos_token_id)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    for name, tensor in hf.state_dict().items():
        if name not in _GGUF_GLOBAL:
            parts = name.split(".")
            name = f"blk.{parts[2]}.{_GGUF_LAYER['.'.join(parts[3:-1])]}.weight"
        writer.add_tensor(_GGUF_GLOBAL.get(name, name), tensor.detach().float().numpy().copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ------------------------------------------------------------------------------------------
# Missing weights
# ------------------------------------------------------------------------------------------


def test_config_naming_more_layers_than_the_weights_is_refused(tmp_path):
    folder = saved(tmp_path / "m")
    edit_config(folder, num_hidden_layers=3)  # the weights hold 2 layers
    with pytest.raises(MissingWeightsError) as err:
        load_hf_model(folder)
    text = one_line(err)
    assert "9 weight(s)" in text and "model.layers.2.input_layernorm.weight" in text
    assert "num_hidden_layers=3" in text and "allow_missing_weights=True" in text
    assert isinstance(err.value, ValueError)
    with pytest.raises(MissingWeightsError):
        StandardizedTransformer(str(folder))  # the user-facing entry point: the same refusal
    # opted in: the partly random model loads (3 layers, the third one random)
    model, _ = load_hf_model(folder, allow_missing_weights=True)
    assert len(model.model.layers) == 3


def test_complete_checkpoints_load_on_every_zoo_type(tmp_path):
    """No false alarm: every zoo type saved and loaded again (tied lm_head / embedding included: gpt2, gemma...)
    loads without MissingWeightsError and with the very weights saved."""
    tied = []
    for model_type in ZOO_REQUIRED:
        folder = saved(tmp_path / model_type, model_type)
        hf, _ = tiny_model(model_type)
        model, _ = load_hf_model(folder)
        if getattr(model.config.get_text_config(), "tie_word_embeddings", False):
            tied.append(model_type)
        expected = hf.state_dict()
        for name, value in model.state_dict().items():
            assert torch.equal(value, expected[name]), (model_type, name)
        shutil.rmtree(folder)
    assert "gpt2" in tied  # the tied case is covered


def test_tied_llama_is_not_missing_its_lm_head(tmp_path):
    folder = saved(tmp_path / "tied", tie_word_embeddings=True)
    model, _ = load_hf_model(folder)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_gguf_naming_more_layers_than_its_tensors_is_refused(tmp_path):
    good = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tok = load_hf_model(good)  # converts and caches (tmp_path/cache)
    hf, zoo_tok = tiny_model("llama")
    assert tok("The cat sat").input_ids == zoo_tok("The cat sat").input_ids
    assert torch.equal(model.model.embed_tokens.weight, hf.model.embed_tokens.weight)
    load_hf_model(good)  # from the cached conversion: checked too, and complete

    bad = write_tiny_gguf(tmp_path / "deep.gguf", extra_blocks=1)
    with pytest.raises(MissingWeightsError) as err:
        load_hf_model(bad)
    text = one_line(err)
    assert "deep.gguf" in text and "9 weight(s)" in text and "model.layers.2." in text
    model, _ = load_hf_model(bad, allow_missing_weights=True, cache_gguf=False)
    assert len(model.model.layers) == 3


# ------------------------------------------------------------------------------------------
# Damaged files
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0.5, 100, 3], ids=["half", "header-cut", "3-bytes"])
def test_truncated_safetensors_names_the_file(tmp_path, keep):
    folder = saved(tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ModelFileError) as err:
        load_hf_model(folder)
    text = one_line(err)
    assert str(weights) in text and "download it again" in text
    assert ("cut short" in text) or ("less than a safetensors header" in text)
    with pytest.raises(ModelFileError, match="model.safetensors"):
        StandardizedTransformer(str(folder))


def test_config_that_is_not_json_names_the_file(tmp_path):
    folder = saved(tmp_path / "m")
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text[: len(text) // 2])  # cut short
    with pytest.raises(ModelFileError) as err:
        load_hf_model(folder)
    message = one_line(err)
    assert str(folder / "config.json") in message and "not valid JSON" in message
    assert "neither a local folder" not in message


def test_folder_without_tokenizer_files(tmp_path):
    hf, _ = tiny_model("llama")
    folder = tmp_path / "m"
    hf.save_pretrained(folder)  # the weights and config only
    with pytest.raises(MissingTokenizerError) as err:
        load_hf_model(folder)
    text = one_line(err)
    assert str(folder) in text and "tokenizer.save_pretrained" in text and "tokenizer=" in text
    assert isinstance(err.value, ValueError) and isinstance(err.value, FileNotFoundError)
    # found before the weights are read: with the weights also damaged, the tokenizer is named
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(MissingTokenizerError):
        load_hf_model(folder)
    # a tokenizer passed in: no tokenizer files needed
    (folder / "model.safetensors").unlink()
    hf.save_pretrained(folder)
    model, tok = load_hf_model(folder, tokenizer=tiny_model("llama")[1])
    assert model.config.num_hidden_layers == 2


def test_sharded_checkpoint_missing_a_shard(tmp_path):
    hf, tok = tiny_model("llama")
    folder = tmp_path / "m"
    hf.save_pretrained(folder, max_shard_size="100KB")
    tok.save_pretrained(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(ModelFileError) as err:
        load_hf_model(folder)
    assert shards[-1].name in one_line(err)


@pytest.mark.parametrize("cut", ["header", "data", "magic"])
def test_truncated_gguf_names_the_file(tmp_path, cut):
    whole = write_tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    reader = gguf.GGUFReader(tmp_path / "whole.gguf")
    data_start = min(int(t.data_offset) for t in reader.tensors)
    keep = {"header": data_start // 2, "data": data_start + 1000, "magic": 3}[cut]
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(whole[:keep])
    with pytest.raises(ModelFileError) as err:
        load_hf_model(broken)
    text = one_line(err)
    assert str(broken) in text and "download or copy it again" in text
    assert {"header": "header is cut short", "data": f"tensors need {len(whole):,}",
            "magic": "header is cut short"}[cut] in text
    (tmp_path / "junk.gguf").write_bytes(b"<html>not found</html>")
    with pytest.raises(ModelFileError, match="GGUF magic"):
        load_hf_model(tmp_path / "junk.gguf")


def test_damaged_cached_conversion_is_converted_again(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    first, _ = load_hf_model(path)
    weights = gguf_cache_dir(path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="cached conversion of tiny.gguf is damaged"):
        again, _ = load_hf_model(path)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_hf_model(path)  # the cache was rewritten whole
