"""Tiny random model zoo for tests: a locally built tokenizer and tiny configs/models for every HF causal-LM type."""

from __future__ import annotations

import functools
import time
import warnings
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers import logging as hf_logging
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

__all__ = [
    "ZOO_REQUIRED",
    "TINY_VOCAB_SIZE",
    "make_tokenizer",
    "tiny_config",
    "tiny_model",
    "all_causal_model_types",
    "buildable_model_types",
    "try_build",
]

# The 29 model types every feature of unilens must work on (tests sweep them).
ZOO_REQUIRED: tuple[str, ...] = (
    "gpt2", "gptj", "gpt_neox", "bloom", "opt", "llama", "mistral", "mixtral", "qwen2", "qwen2_moe",
    "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "stablelm", "olmo", "olmo2",
    "dbrx", "gpt_oss", "cohere", "granite", "falcon", "starcoder2", "deepseek_v3", "glm4_moe", "smollm3",
)  # fmt: skip

TINY_VOCAB_SIZE = 512

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN]  # ids 0, 1, 2, 3

# A small English corpus, enough for a few hundred byte-level BPE merges of common words.
_CORPUS = """
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
The capital of Spain is Madrid. The capital of Japan is Tokyo. The capital of England is London.
Paris is a city in France. Berlin is a city in Germany. Rome is the largest city in Italy.
The Eiffel Tower is in Paris. The Colosseum is in Rome. Big Ben is in London.
When Mary and John went to the store, John gave a drink to Mary.
When Alice and Bob went to the park, Bob gave a ball to Alice.
The cat sat on the mat. The dog ran in the park. The bird sang in the tree.
One, two, three, four, five, six, seven, eight, nine, ten.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday.
January, February, March, April, May, June, July, August, September, October, November, December.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
In the beginning there was the word, and the word was with the model.
The sun rises in the east and sets in the west. Water boils at one hundred degrees.
The opposite of hot is cold. The opposite of big is small. The opposite of up is down.
I like to read books about history, science and the world. She writes letters to her friends.
He said that the answer was yes. They said that the answer was no. We think that it is true.
The model predicts the next token. The attention head moves information between positions.
The residual stream carries information from one layer to the next layer of the transformer.
Language models learn to predict words from the context of the previous words in the sentence.
"""


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    """Train (once per vocab size) a byte-level BPE tokenizer on `_CORPUS`; returns its JSON."""
    n_base = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)  # 256 bytes + specials
    if vocab_size < n_base:
        raise ValueError(
            f"make_tokenizer: vocab_size={vocab_size} is too small for a byte-level tokenizer "
            f"(needs >= {n_base}: 256 bytes + {len(SPECIAL_TOKENS)} special tokens); pass a larger vocab_size."
        )
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    # add_prefix_space=False: " Paris" and "Paris" tokenise differently, as in GPT-2.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in _CORPUS.strip().splitlines()], trainer=trainer)
    return tok.to_str()


def make_tokenizer(vocab_size: int = TINY_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE tokenizer built locally (no Hub), with at most `vocab_size` tokens.

    Special tokens: `<|pad|>`=0, `<|bos|>`=1, `<|eos|>`=2, `<|unk|>`=3. No BOS is added automatically
    (GPT-2 style). Padding is on the left, so position -1 is the last real token of every prompt.
    The trained tokenizer is cached; each call returns a fresh wrapper, so mutating it is safe.

    Example:
        >>> tok = make_tokenizer(512)
        >>> batch = tok(["The capital of France is", "Hi"], padding=True, return_tensors="pt")
        >>> tok(" Paris").input_ids != tok("Paris").input_ids
        True
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(int(vocab_size))),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tok


# --------------------------------------------------------------------------------------------
# Tiny configs
# --------------------------------------------------------------------------------------------

# Generic small values, applied to whichever of these keys a config class has (by its real
# attribute names, so aliases like `n_embd` / `d_model` are covered by listing them).
_GENERIC: dict[str, Any] = {}


def _set(value: Any, *keys: str) -> None:
    for key in keys:
        _GENERIC[key] = value


_set(TINY_VOCAB_SIZE, "vocab_size", "vocab_size_per_layer_input")
_set(64, "hidden_size", "n_embd", "d_model", "emb_dim", "embedding_dim", "embedding_size", "word_embed_proj_dim",
     "input_embedding_size", "output_embedding_size", "lru_width", "hidden_size_global", "adapter_in_dim",
     "adapter_out_dim", "adapter_input_size")  # fmt: skip
_set(2, "num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers",
     "num_decoder_layers", "num_encoder_layers")  # fmt: skip
_set(4, "num_attention_heads", "n_head", "n_heads", "num_heads", "attention_heads", "decoder_attention_heads",
     "encoder_attention_heads", "num_decoder_attention_heads", "num_encoder_attention_heads",
     "swa_num_attention_heads")  # fmt: skip
_set(2, "num_key_value_heads", "num_kv_heads", "kv_n_heads", "swa_num_key_value_heads", "num_query_groups")
_set(128, "intermediate_size", "n_inner", "ffn_dim", "dff", "d_inner", "ffn_hidden_size", "decoder_ffn_dim",
     "encoder_ffn_dim", "dim_ff", "feed_forward_size", "intermediate_size_mlp", "dense_intermediate_size",
     "mamba_d_ssm")  # fmt: skip
_set(16, "head_dim", "d_head", "dim_head", "attention_head_size", "attention_head_dim", "kv_channels",
     "swa_head_dim", "mamba_d_head", "mamba_head_dim", "mamba_headdim", "linear_key_head_dim",
     "linear_value_head_dim", "linear_head_dim", "index_head_dim", "hidden_size_per_layer_input")  # fmt: skip
# MoE: 4 experts, top-2 routing, one shared expert, a single routing group.
_set(64, "moe_intermediate_size", "shared_expert_intermediate_size", "shared_experts_intermediate_size",
     "shared_intermediate_size", "expert_ffn_hidden_size", "moe_shared_expert_intermediate_size")  # fmt: skip
_set(4, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_set(2, "num_experts_per_tok", "moe_topk", "moe_k", "moe_top_k", "num_experts_per_token", "top_k_experts")
_set(1, "n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "n_group", "num_expert_group",
     "topk_group")  # fmt: skip
# MLA (DeepSeek-style latent attention).
_set(16, "kv_lora_rank", "v_head_dim", "qk_head_dim")
_set(32, "q_lora_rank")
_set(8, "qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim", "laurel_rank")
# Windows smaller than a test prompt (~7-12 tokens), so windowing is actually exercised.
_set(4, "sliding_window", "sliding_window_size", "attention_window_size", "local_attention_window_len",
     "attention_chunk_size", "window_size")  # fmt: skip
_set(128, "max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions")
# Linear-attention / SSM mixers.
_set(2, "index_n_heads", "linear_num_key_heads")
# Sparse attention (DeepSeek DSA, MiniMax M3 block selection): fewer selected keys / blocks than a test prompt
# has tokens, so the selection binds (the default 2048 keys never would, and a mishandled selection would pass).
_set(4, "index_topk")
_set(2, "index_block_size", "index_topk_blocks")
_set(4, "linear_num_value_heads", "linear_num_heads", "mamba_dt_rank", "time_step_rank")
_set(8, "mamba_n_heads", "n_mamba_heads", "mamba_num_heads")  # (hidden 64 * expand 2) / head 16
_set(16, "mamba_d_state", "state_size", "ssm_state_size", "mamba_chunk_size", "chunk_size")
# Scalar layer-pattern knobs: with 2 layers, layer 0 is dense / of the first kind, layer 1 the other.
_set(1, "first_k_dense_replace", "num_dense_layers", "moe_layer_start_index", "decoder_sparse_step",
     "interleave_moe_layer_step", "moe_layer_interval")  # fmt: skip
_set(2, "sliding_window_pattern", "_sliding_window_pattern", "global_attn_every_n_layers")

# Keys whose value lists one entry per decoder layer (kinds, flags, sizes); subset with the layers.
_INDEX_LIST_KEYS = ("moe_layers", "mlp_only_layers", "attn_layer_indices", "hybrid_layer_ids", "full_attn_idxs",
                    "ple_layer_ids", "local_layer_ids")  # fmt: skip
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "num_decoder_layers")

# Per-type quirks: each only where the generic values above do not build or do not exercise the
# feature the zoo is meant to exercise. Applied last (they win over generic values).
_QUIRKS: dict[str, dict[str, Any]] = {
    # mistral's config has no layer_types; its sliding_window is the only window knob.
    "mistral": {"sliding_window": 4},
    # Gemma 2: soft-capping of attention and final logits on (the defaults, pinned here because
    # the zoo must exercise them).
    "gemma2": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
    # dbrx: the attention sub-config's rope_theta is not in its to_dict(), so it must be passed.
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    # xlstm: block sizes derive from embedding_dim and need a multiple of 64 per head.
    "xlstm": {"hidden_size": 128, "embedding_dim": 128},
    # xlm is bidirectional unless `causal=True`.
    "xlm": {"causal": True},
    # mamba2: num_heads * head_dim must equal expand (2) * hidden_size (64); one group.
    "mamba2": {"num_heads": 8, "head_dim": 16, "n_groups": 1},
    # Hybrids whose default layer pattern has no attention layer within the first layers.
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},  # a cycle, not one entry per layer
    # lfm2_moe derives layer_types at build time when None; one conv and one attention layer, the
    # first MLP dense and the second sparse.
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # zamba ties the shared transformer across its hybrid layers: it needs at least two of them.
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["linear_attention", "hybrid", "hybrid"]},
    # zaya: a full and a sliding hybrid layer; its router MLP has its own width; top-1 routing is
    # what its validator accepts with 4 experts.
    "zaya": {"layer_types": ["hybrid", "hybrid_sliding"], "num_experts_per_tok": 1, "router_hidden_size": 16},
    # cohere_compass keeps one rope setting per layer type; the default only lists the types of
    # its default layer pattern.
    "cohere_compass_text": {"rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},  # fmt: skip
    # gemma3n: KV sharing needs both a full and a sliding layer among the shared layers, so 4
    # layers; activation sparsity only on the first layer; 2 AltUp streams.
    "gemma3n_text": {"num_hidden_layers": 4, "num_kv_shared_layers": 2, "altup_num_inputs": 2,
                     "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
                     "activation_sparsity_pattern": [0.95, 0.0, 0.0, 0.0], "intermediate_size": [128] * 4},  # fmt: skip
    # xmod routes through per-language adapters and refuses to run without a default language.
    "xmod": {"default_language": "en_XX"},
    # dots3: its validator wants head_dim == qk_nope_head_dim + qk_rope_head_dim (not the rope part
    # alone as in DeepSeek); its sliding-window MLA layers keep one KV head per query head too.
    "dots3_note_text": {"head_dim": 16, "swa_head_dim": 16, "swa_num_key_value_heads": 4},
    # qwen4_exp: its n-gram embedding / hyper-connection / indexer sizes default to None or huge.
    "qwen4_exp_text": {"linear_conv_kernel_dim": 2, "hc_count": 2, "hc_lowrank": 8, "ple_layer_ids": [1],
                       "ple_embed_dim": 16, "ple_conv_kernel_size": 2, "ngram_size": 3, "heads_per_ngram": 2,
                       "ngram_vocab_size_base": 31, "make_ngram_vocab_size_divisible_by": 8, "split_ngram_parts": 4,
                       "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 4,
                       "indexer_compress_ratio": 2,
                       # the composite qwen4_exp's text default says 1 conv state; PLE layers use 3
                       "number_of_conv_states": 3,
                       # the rotary part of a 16-dim head must fit the 8-dim indexer head
                       "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25, "rope_theta": 1e4}},
    # minimax_m3: its default layers are all dense; layer 1 sparse (block selection by its indexer) exercises it.
    "minimax_m3_vl_text": {"layer_types": ["full_attention", "minimax_m3_sparse"]},
    # musicgen decoders read (batch * num_codebooks, seq) token ids; one codebook makes a plain
    # (batch, seq) batch valid input.
    "musicgen_decoder": {"num_codebooks": 1},
    "musicgen_melody_decoder": {"num_codebooks": 1},
    # reformer: axial position embeddings must factor max_position_embeddings and sum to hidden;
    # one local and one LSH layer with 4-token chunks.
    "reformer": {"attn_layers": ["local", "lsh"], "axial_pos_embds_dim": [32, 32], "axial_pos_shape": [4, 8],
                 "max_position_embeddings": 32, "local_attn_chunk_length": 4, "lsh_attn_chunk_length": 4,
                 "num_buckets": 4, "num_hashes": 1},  # fmt: skip
    # kolibri1_1: one sliding layer, an indexer layer that stores its keys / values and selects a key pool, and a
    # reindexer layer that attends to the indexer's keys / values (no k/v projections of its own) and rescores its
    # pool; layer 0 dense, the others MoE. Pool, top-k, sink and local sizes below a test prompt's length, so the
    # selection binds; index heads at most the query heads of key head 0 (4 // 2).
    "kolibri1_1": {"num_hidden_layers": 3,
                   "layer_types": ["sliding_attention", "indexed_attention", "indexed_attention"],
                   "kv_source_layers": [0, 1, 1], "index_layers": [1], "mlp_only_layers": [0],
                   "mlp_only_intermediate_size": 128, "index_num_heads": 2, "index_pool_size": 4,
                   "index_compression": 2, "index_num_local_tokens": 2, "index_num_sink_tokens": 1},
    # dory: its to_dict() lists each layer as an (attention, "mlp") block pair with doubled counts, which the generic
    # shrink cannot halve back; one input, one recurrent (looped twice, the feature) and one output layer.
    "dory": {"num_hidden_layers": 3, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
             "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1, "n_recurrent_loops": 2},
    # big_bird: block-sparse attention only runs on sequences longer than its blocks allow; on shorter ones (every
    # test prompt) the model swaps in full attention at run time, replacing the module unilens hooked. Full
    # attention from the start is what those prompts run anyway.
    "big_bird": {"attention_type": "original_full"},
    # blt: bytes in (vocab 256 + 4 specials); its hash-n-gram table is 500k rows by default.
    # use_cache=False: in transformers 5.23 BLT's forward builds a DynamicCache from its composite
    # config, which has no num_hidden_layers, and raises.
    "blt": {"use_cache": False, "vocab_size": 260, "encoder_hash_byte_group_vocab": 1024, "patch_size": 4, "cross_attn_k": 2,
            "patching_mode": "entropy"},  # fmt: skip
    "blt_patcher": {"vocab_size": 260},
    "blt_local_encoder": {"vocab_size": 260, "num_hidden_layers": 1},
    "blt_local_decoder": {"vocab_size": 260},
}

# The ids of make_tokenizer()'s special tokens; configs that have these keys get them.
_SPECIAL_IDS = {
    "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
    "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
    "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
}

_DROPOUT_MARKERS = ("dropout", "pdrop", "layerdrop", "jitter_noise")


def _is_dropout_key(key: str) -> bool:
    return any(marker in key for marker in _DROPOUT_MARKERS)


def _num_layers_of(d: dict[str, Any]) -> tuple[str | None, int | None]:
    for key in _LAYER_COUNT_KEYS:
        if isinstance(d.get(key), int) and not isinstance(d.get(key), bool):
            return key, d[key]
    return None, None


def _select_layers(d: dict[str, Any]) -> dict[str, Any]:
    """Pick the fewest layers (>= 2) that still contain every distinct per-layer kind in `d`.

    A layer's kind is the tuple of its entries in every per-layer list (`layer_types`,
    `mlp_layer_types`, `no_rope_layers`, ...) and its membership of every layer-index list
    (`moe_layers`, `mlp_only_layers`, ...). Returns overrides for the layer count and those lists.
    """
    count_key, n_layers = _num_layers_of(d)
    if count_key is None or n_layers is None or n_layers < 1:
        return {}
    per_layer = {
        k: v for k, v in d.items()
        if isinstance(v, list) and len(v) == n_layers and n_layers > 1 and not k.startswith("_")
        and all(isinstance(x, (str, int, float, bool)) for x in v)
    }  # fmt: skip
    index_lists = {k: v for k, v in d.items() if k in _INDEX_LIST_KEYS and isinstance(v, list)}
    # Heterogeneous configs: {"05": {"head_dim": 512}, ...} overrides for single layers.
    per_layer_config = {int(k): v for k, v in (d.get("per_layer_config") or {}).items()}
    chosen: list[int] = []
    seen: set[tuple] = set()
    for i in range(n_layers):
        kind = tuple(v[i] for v in per_layer.values()) + tuple(i in v for v in index_lists.values())
        kind += (repr(sorted(per_layer_config.get(i, {}).items())),)
        if kind not in seen:
            seen.add(kind)
            chosen.append(i)
    for i in range(n_layers):  # at least 2 layers, so "every layer" and "the last layer" differ
        if len(chosen) >= 2:
            break
        if i not in chosen:
            chosen.append(i)
    chosen.sort()
    out: dict[str, Any] = {count_key: len(chosen)}
    for k, v in per_layer.items():
        out[k] = [v[i] for i in chosen]
    for k, v in index_lists.items():
        out[k] = [new for new, old in enumerate(chosen) if old in v]
    if per_layer_config:
        out["per_layer_config"] = {
            str(new): _shrink_values(per_layer_config[old]) for new, old in enumerate(chosen) if old in per_layer_config
        }
    return out


def _shrink_values(entry: dict[str, Any]) -> dict[str, Any]:
    """Generic small values for the size keys of one per-layer override entry."""
    out = {k: (_GENERIC[k] if k in _GENERIC and isinstance(v, int) else v) for k, v in entry.items()}
    if "kv_lora_rank" in out and "num_attention_heads" in out:  # MLA: one latent KV per query head
        out["num_key_value_heads"] = out["num_attention_heads"]
    return out


def _shrink(config: PretrainedConfig, model_type: str | None) -> dict[str, Any]:
    """Overrides (a plain dict) that make `config` tiny, recursing into sub-configs."""
    d = config.to_dict()
    out: dict[str, Any] = {}
    # Sub-configs first (text/vision/audio towers, dbrx ffn/attn, ...).
    for key, value in d.items():
        sub = config.__dict__.get(key)  # not getattr: heterogeneous configs refuse global per-layer reads
        if isinstance(sub, PretrainedConfig):
            sub_out = _shrink(sub, sub.model_type)
            merged = sub.to_dict()
            merged.update(sub_out)
            out[key] = merged
    layer_out = _select_layers(d)
    n_layers = next(iter(layer_out.values()), None)
    for key, value in d.items():
        if key in out:
            continue
        if key in _GENERIC and not isinstance(value, bool):
            new = _GENERIC[key]
            if isinstance(value, list):  # per-layer sizes (e.g. gemma3n's intermediate_size)
                out[key] = [new] * len(layer_out.get(key, value))
            elif isinstance(value, (int, float)) or value is None:
                out[key] = new
        elif key.startswith("swa_") and key[4:] in _GENERIC and isinstance(value, int):
            out[key] = _GENERIC[key[4:]]  # sliding-window layers' own sizes (inkling, dots3)
        elif key in _SPECIAL_IDS and key in d:
            out[key] = _SPECIAL_IDS[key]
        elif _is_dropout_key(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = type(value)(0)  # keep int/float: strict config dataclasses check the type
    for key, value in layer_out.items():
        if key in _GENERIC and isinstance(value, list):
            continue  # sizes handled above
        out[key] = value
    if n_layers is not None:
        for key in _LAYER_COUNT_KEYS:  # enc-dec configs: shrink every stack to the same depth
            if key in d and key not in layer_out:
                out[key] = _GENERIC[key]
    # MLA: the "head_dim" used for rotary embeddings is the rope part of the query/key head.
    # MLA also keeps one latent key/value per query head (no grouped-query sharing).
    if "kv_lora_rank" in d and "qk_rope_head_dim" in d:
        if "head_dim" in d:
            out["head_dim"] = _GENERIC["qk_rope_head_dim"]
        if "num_key_value_heads" in d:
            out["num_key_value_heads"] = out.get("num_attention_heads", d.get("num_attention_heads"))
    # Decoder-capable encoders (BERT family, reformer): causal self-attention only with is_decoder=True.
    if d.get("is_decoder") is False and not d.get("is_encoder_decoder"):
        out["is_decoder"] = True
    if model_type in _QUIRKS:
        for key, value in _QUIRKS[model_type].items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


def _config_class(model_type: str) -> type[PretrainedConfig]:
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"tiny_config: unknown model_type {model_type!r}; pick one of all_causal_model_types()."
        )
    return CONFIG_MAPPING[model_type]


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A tiny (hidden 64, 2-4 layers, 4 heads, vocab 512) float32 config for any causal-LM model type.

    Generic small values are applied to whichever size keys the config class has; per-layer kind
    lists (`layer_types`, `mlp_layer_types`, ...) keep one layer of each kind; dropout is 0; windows
    are 4 tokens. `overrides` win over everything.

    Example:
        >>> cfg = tiny_config("gemma2")
        >>> cfg.hidden_size, cfg.num_hidden_layers, cfg.sliding_window
        (64, 2, 4)
    """
    cls = _config_class(model_type)
    with _quiet():
        default = cls()
        kwargs = _shrink(default, model_type)
        kwargs.update(overrides)
        config = cls(**kwargs)
    # musicgen & co.: the causal-LM class takes one sub-config (the decoder) of a composite config.
    wanted = _model_class(model_type).config_class
    if not isinstance(config, wanted):
        subs = [v for v in vars(config).values() if isinstance(v, wanted)]
        if len(subs) == 1:
            config = subs[0]
    config.dtype = torch.float32
    return config


class _quiet:
    """Silence transformers' config/model-building chatter (warnings stay visible elsewhere)."""

    def __enter__(self) -> None:
        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc: object) -> None:
        self._warnings.__exit__(*exc)
        hf_logging.set_verbosity(self._level)


# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------


def _model_class(model_type: str) -> type[PreTrainedModel]:
    return AutoModelForCausalLM._model_mapping[_config_class(model_type)]


def _text_config(config: PretrainedConfig) -> PretrainedConfig:
    """The config that owns the vocabulary (the text tower of multimodal wrappers)."""
    sub = getattr(config, "text_config", None)
    return sub if isinstance(sub, PretrainedConfig) else config


def tiny_model(
    model_type: str,
    seed: int = 0,
    attn_implementation: str | None = None,
    **overrides: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A seeded, tiny, random-weight float32 causal LM in eval mode, and a matching tokenizer.

    The tokenizer's vocabulary fits the model's (`len(tok) <= vocab_size`) and the config's
    pad/bos/eos ids are the tokenizer's. `attn_implementation` is passed to `from_config`
    (default: transformers' choice).

    Example:
        >>> model, tok = tiny_model("llama")
        >>> batch = tok(["The capital of France is", "Hello"], padding=True, return_tensors="pt")
        >>> model(**batch).logits.shape[:2] == batch.input_ids.shape
        True
    """
    config = tiny_config(model_type, **overrides)
    text = _text_config(config)
    tok = make_tokenizer(min(TINY_VOCAB_SIZE, int(text.vocab_size)))
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    for cfg in {id(config): config, id(text): text}.values():
        present = cfg.to_dict()
        for key, value in ids.items():
            if key in present and key not in overrides:
                setattr(cfg, key, value)
    model_cls = _model_class(model_type)
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _quiet():
        model = model_cls._from_config(config, **kwargs)
    model.eval()
    return model, tok


def all_causal_model_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class, sorted.

    Example:
        >>> "llama" in all_causal_model_types()
        True
    """
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def try_build(model_type: str) -> tuple[bool, str, float]:
    """Build `tiny_model(model_type)` and run one forward; returns (ok, error message, seconds)."""
    start = time.perf_counter()
    try:
        model, tok = tiny_model(model_type)
        batch = tok(["The capital of France is", "Hello"], padding=True, return_tensors="pt")
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    except Exception as exc:  # noqa: BLE001 - the support report lists every failure with its reason
        reason = exc.__cause__ or exc  # strict config validators wrap the real error
        message = " ".join(f"{type(reason).__name__}: {reason}".split())[:300]
        return False, message, time.perf_counter() - start
    return True, "", time.perf_counter() - start


@functools.lru_cache(maxsize=1)
def _buildable() -> tuple[str, ...]:
    # One intra-op thread for the sweep: tiny matmuls gain nothing from threads, and on a loaded
    # machine OpenMP spinning makes them several times slower. Restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return tuple(t for t in all_causal_model_types() if try_build(t)[0])
    finally:
        torch.set_num_threads(before)


def buildable_model_types() -> list[str]:
    """The model types for which `tiny_model` builds and runs a forward pass here (cached).

    Example:
        >>> "gpt2" in buildable_model_types()
        True
    """
    return list(_buildable())
