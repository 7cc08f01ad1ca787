"""Streaming activation cache: per-token activations of many texts in resumable safetensors shards.

Layout of a store (``out_dir``)::

    manifest.json              model identity, numerics settings, arguments, per-name row shape / dtype, shard list
                               (checksums), its own checksum
    shard_00000.safetensors    every requested name's rows for the shard + ``token_ids``, ``text_index``, ``position``
    shard_00001.safetensors    ...
    .lock                      while a run writes: the writer's pid and host (`unilens.scale.store_lock`)

One *row* is one real (non-padding) token. Rows are stored in text order, then position order, whatever
order the batches ran in: row ``r`` of every name belongs to text ``text_index[r]`` at token ``position[r]``.

Names are the standardized names the catalogue (`unilens.core.names`) gives a store layout: per layer with a layer,
``"layers_output.12"``, ``"mlps_output.*"`` (every layer that has one), ``"attention_probabilities.3"``, and whole-model
``"logits"``, ``"token_embeddings"``, ``"position_embeddings"`` (`CACHEABLE_NAMES`). Per-token row shapes:

=================================================  ===================================================
``layers_input`` / ``layers_output``, ``attentions_input`` / ``attentions_output``, ``mlps_input`` /
``mlps_output``, ``token_embeddings``,
``position_embeddings``                            ``(hidden,)``
``attention_queries`` / ``_keys`` / ``_values``    ``(heads, head_dim)`` (key/value heads for keys/values)
``attention_heads``                                ``(heads, head_dim)``
``attention_head_results``                         ``(heads, hidden)``
``attention_probabilities``                        ``(heads, key_length)``: the query token's attention
                                                   over key positions ``0..key_length-1`` of its own text;
                                                   ``key_length`` is ``max_length`` when given, else the
                                                   longest text. Keys after the query (causal) and past the
                                                   text's end are exactly 0.
``logits``                                         ``(vocab,)``
=================================================  ===================================================

Shards are contiguous groups of texts closed as soon as they hold ``shard_tokens`` rows, so boundaries depend
only on the inputs and arguments. Within a shard, texts are sorted by length into batches (right padding,
so each real token sees exactly what it would see alone); the batch plan is deterministic too, so a resumed
run is byte-identical to an uninterrupted one. Each shard is a safetensors file written in place under a ``.tmp``
name as its batches run (every activation is copied once, from the model's tensor into the file, and hashed with
xxh3 on the way), fsynced, renamed, and only then is ``manifest.json`` rewritten (temp + fsync + rename): a kill at any
moment leaves a store that the same call resumes from its last complete shard. Memory holds one batch's
activations (no shard is built in memory). Module inputs / outputs (``layers_*``, ``attentions_*``, ``mlps_*``) are
read by torch hooks on the modules the accessors read (tested bitwise against them on every architecture); when
nothing else is asked for, the batch runs the model's forward without an nnsight trace.

Stores that cannot come back wrong (store format 4): every shard carries a checksum in the manifest (xxh3_128 of its
header and of each tensor's rows of each text, taken as the rows are written) and, in its own safetensors metadata,
the run that wrote it, its index and the digest of its data. `ActivationStore` checks the manifest when it opens the
store (JSON, its own checksum, entries in order) and each shard the first time it reads it (hashed as read: about
the cost of reading it); a damaged file is a `CacheCorruptError` naming it and the repair. Running the same call again
verifies every finished shard from its bytes, recomputes damaged ones (with a warning naming them), and rebuilds a
damaged or missing manifest from the shards that verify. The manifest's model fingerprint hashes every parameter
and records the numerics settings (device and GPU, parameter dtypes, torch thread count and CPU instruction set,
TF32, library versions): a resume under another model or settings is refused (`CacheMismatchError`) listing the
differences. A second process writing to the same ``out_dir`` fails at once (`CacheLockedError`); the lock of a
process that died is taken over. Stores of formats 1-3 are read and verified; a complete one is returned by the same
call as it is, an incomplete one is not resumed (its fingerprint samples 3 parameters).

Texts that are empty (``""``) or tokenize to no token are skipped with a warning; their indices are listed in
the manifest (``inputs.skipped_texts``) and other texts keep their original ``text_index``.

Data parallel (`unilens.core.distributed`): under an initialized ``torch.distributed`` process group (``torchrun
--nproc-per-node N -m unilens cache ...``), every rank plans the same shards, the shards still to compute are dealt
round robin over ranks, each rank writes its own shard files plus a ``shard_k.done.json`` record, and rank 0 alone
writes ``manifest.json`` (at the start, and after gathering every rank's records at the end); rank 0 holds the lock
for the whole job. Shard bytes depend only
on the inputs and arguments, so the store is byte-identical to a one-process run; a relaunch after a crash of any
rank keeps every recorded shard and computes the rest.

Packed contexts (``context_size=n``, SAELens's caching): the texts are tokenized without special tokens and packed,
in order, into contexts of exactly ``n`` tokens, SAELens's ``ActivationsStore`` rules: a context starts with BOS
(``prepend_bos=True``; not added where the next text token is BOS itself), a text joining an open context is
preceded by the separator (``separator="bos"``, or ``"eos"``, ``"sep"``, a token id, ``None``; not added where the
text starts with it), a text longer than the room left runs on into the next context (which starts with BOS, no
separator), a separator that takes a context's last slot ends it, and the last context, unless full, is dropped
(``packing.dropped_tokens`` in the manifest counts its text tokens). The model runs on the contexts, ``batch_size``
per forward, with no padding, so every token sees its context as SAELens's model sees it. The store's units are
the contexts: ``text_index`` is a row's context and ``position`` its position there; every token of a context
is a row, BOS and separators included (SAELens keeps them), unless ``exclude_sinks=True``, which drops the rows of
each context's first token and of the separators packing inserted (they still run: the other rows are unchanged).
The manifest records the packing (``"packing"``) and ``export_to_datasets`` then writes one context per row.

Early stop: a forward stops right after the last requested name is read (a hook raising, or nnsight's
``tracer.stop()``): for ``layers_output.3`` of a 30-layer model, 4 layers run and no unembedding; only ``logits``
runs the model to its end.

Generation (``generate_tokens=n``): each text is continued greedily by the model's own ``generate`` (KV cache on)
and the activations of every token fed through the model are read during generation, step by step (one text per
``generate`` call): a text's rows are its prompt tokens, then up to ``n`` generated tokens (fewer when the model
ends the text; the token after the last row is generated but never fed back, so it has none).

The modules behind this public face: `unilens.scale.store_format` (cacheable names from the catalogue, errors,
checksums, fingerprints, manifest checks), `unilens.scale.store_lock` (one writer per store), `unilens.scale.plan` (tokens, shard plan, batches), `unilens.scale.capture` (reading the
activations out of the model), `unilens.scale.shard_file` (shard files and atomic writes), `unilens.scale.writer`
(`cache_activations`), `unilens.scale.reader` (`ActivationStore`, `ActivationDataset`) and
`unilens.scale.cli_cache` (`read_texts`, `main_cache`, the command line).
"""

from __future__ import annotations

import sys

from .cli_cache import main, main_cache, read_texts
from .reader import ActivationDataset, ActivationStore
from .store_format import (
    CACHEABLE_NAMES,
    CacheCorruptError,
    CacheDiskFullError,
    CacheError,
    CacheLockedError,
    CacheMismatchError,
    CacheNotFoundError,
)
from .writer import cache_activations

__all__ = [
    "ActivationStore",
    "ActivationDataset",
    "CacheError",
    "CacheDiskFullError",
    "CacheCorruptError",
    "CacheMismatchError",
    "CacheLockedError",
    "CacheNotFoundError",
    "cache_activations",
    "main_cache",
    "read_texts",
    "CACHEABLE_NAMES",
]

if __name__ == "__main__":  # python -m unilens.cache (unilens.cache is this module)
    sys.exit(main())
