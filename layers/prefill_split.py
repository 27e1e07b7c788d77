"""A prefill chunk on non-empty slots as two flash passes and an exact merge (issue 20).

A chunk of T tokens continuing slots that already hold `start` [b] tokens
attends causally over the slot's entries 0..start-1 and its own tokens. The
two sets need different masks, and neither needs a dense one:

(a) the chunk's queries over the entries cached before the step: every one is
    an earlier position, so the mask is only "key index < start" (a per-row
    key length), no causal mask;
(b) the chunk over itself: causal, top-left aligned (both start at the
    chunk's first token), right padding by the number of valid tokens.

Each runs through a partial kernel that also returns its log-sum-exp
(kernels/train/partial_attention.py: cuDNN on the GPU, the XLA reference
elsewhere), and `merge_partials` combines them exactly in float32; sinks
join the merge's denominator. A row with nothing cached (start 0) gets
exactly (b). The whole-slot path (prefill_attention.whole_slot_attention) gives
cuDNN the same problem as one call under a [b, 1, T, C] boolean mask, which
cuDNN can only take as a dense bias.

Exact where it runs: causal (`global`) mask, no soft cap, score_mod or
mask_mod, a contiguous cache that is no ring buffer, or a paged cache (entry
j of a slot holds position j; the paged cache gathers the slot through its
page table). Like the block-by-block reference path, (b) attends over the
step's own keys/values as computed, (a) over the cache as stored (an int8 /
int4 cache dequantized). Everything else keeps the other paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from meshattn.kvcache.base import KVCacheBase
from meshattn.layers.kernels import dispatch, registry
from meshattn.layers.kernels.train.flash_gpu import CUDNN_LIMITS
from meshattn.layers.kernels.train.partial_attention import (
    PartialAttention, cudnn_partial_attention, cudnn_partial_usable, merge_partials)
from meshattn.sharding import logical_to_spec

# The layer's `attention` names whose GPU kernel is cuDNN first: the split path stands in
# for their whole-slot call. A kernel the user named otherwise (blockwise, ring) keeps its own.
CUDNN_ATTENTION_NAMES = frozenset({"autoselected", "flash"})


def partial_kernel(settings) -> PartialAttention | None:
  """The partial kernel for this layer's prefill chunks, or None (keep the other paths).

  cuDNN on the GPU where the layer's train attention would run cuDNN and it
  takes the dtype and head_dim (CUDNN_LIMITS), and the private API
  passes its one-time check. CPU tests substitute the XLA reference here.
  """
  if dispatch.platform(settings) != "gpu" or settings.attention not in CUDNN_ATTENTION_NAMES:
    return None
  request = registry.Request("gpu", "train", frozenset(), head_dim=settings.head_dim,
                             dtype=settings.dtype)
  if CUDNN_LIMITS.violations(request) or not cudnn_partial_usable():
    return None
  return cudnn_partial_attention


def split_chunk_attention(layer, cache, axes, *, sinks, kernel: PartialAttention | None = None,
                         all_slots: bool = False):
  """fn(cache, rows, query, key, value, start, valid) -> context [b, T, N, H] for
  `cached_step`, or None where the split is not exact or no partial kernel serves.
  kernel: the partial kernel (default `partial_kernel(layer.settings)`); all_slots: the
  step's rows are the cache's slots 0..B-1 in order (then a contiguous cache stored in
  the compute dtype is read in place, see `reads_in_place`)."""
  s = layer.settings
  exact = (s.mask.plain_causal and not s.attn_logits_soft_cap
           and s.score_mod is None and s.mask_mod is None)
  # Entry j of a slot must hold position j: a key/value cache (contiguous or paged), no ring.
  if not exact or not isinstance(cache, KVCacheBase) or cache.window:
    return None
  kernel = kernel or partial_kernel(s)
  if kernel is None:
    return None

  def attend(cache, rows, query, key, value, start, valid):
    in_place = all_slots and reads_in_place(cache, query.dtype)
    k_old, v_old = cache.read_block(None if in_place else rows, 0, cache.capacity,
                                    query.dtype)  # [b, C, K, H]
    return split_attention(kernel, query, k_old, v_old, key, value, start=start, valid=valid,
                           scale=s.scale, sinks=sinks, mesh=layer.mesh,
                           rules=s.logical_axis_rules, axes=axes, old_zeroed=in_place)

  return attend


def reads_in_place(cache, dtype) -> bool:
  """Whether the first pass can take the cache's K/V buffers as they are (no gather, no
  dequantization, no select: a pass over the whole cache saved, ~65 us of 1.2 ms for a
  512-token chunk over 3584 cached on the H200): a contiguous cache stored in `dtype`.

  This leans on the cache's invariant that a slot's entries at or past its length hold
  zeros (`KVCache`: created zeroed, `reset` and `insert` clear the slot, writes land
  below the new length, padding tokens are never written). The step writes first, so
  entries start..new_length-1 hold the chunk's own (real) tokens; the first pass masks
  them by kv_lengths = start, and their values are finite wherever the outputs are.
  """
  return (cache.slots_are_rows and not cache.quant and not cache.window
          and cache.storage_dtype == dtype)


def split_attention(kernel: PartialAttention, query: jax.Array, k_old: jax.Array,
                    v_old: jax.Array, key: jax.Array, value: jax.Array, *, start: jax.Array,
                    valid: jax.Array, scale: float, sinks: jax.Array | None = None,
                    mesh=None, rules=(), axes=None, old_zeroed: bool = False) -> jax.Array:
  """query [b, T, N, H] over the slot's old entries k_old/v_old [b, C, K, H] (entry j at
  position j, the first start [b] of them real) and its own key/value [b, T, K, H] (the
  first sum(valid) real: valid [b, T] is a prefix). Returns [b, T, N, H] in the query dtype;
  padding queries give zeros. Under a mesh, each shard takes its batch rows and heads.
  old_zeroed: k_old/v_old past `start` are known to be finite (the cache read in place,
  `reads_in_place`); otherwise they are zeroed here."""
  n_new = jnp.sum(valid, axis=1, dtype=jnp.int32)  # [b]
  if not old_zeroed:
    # Entries past `start` may hold anything (a test's planted NaN, a gathered copy's
    # padding): zeroed, fused into the gather / dequantization that copies them anyway, as
    # cuDNN multiplies a masked key's zero weight by its value.
    old = jnp.arange(k_old.shape[1], dtype=jnp.int32)[None, :] < start[:, None]  # [b, C]
    k_old, v_old = (jnp.where(old[:, :, None, None], x, jnp.zeros((), x.dtype))
                    for x in (k_old, v_old))
  # Padding tokens' keys/values may hold anything (a NaN in a padding input): zeroed. A
  # padding query only reaches its own output row, which is selected away at the end.
  key, value = (jnp.where(valid[:, :, None, None], x, jnp.zeros((), x.dtype)) for x in (key, value))

  def local(query, k_old, v_old, key, value, start, n_new, valid, sinks):
    out_a, lse_a = kernel(query, k_old, v_old, q_lengths=n_new, kv_lengths=start, causal=False,
                          scale=scale)  # [b, T, N, H], [b, T, N]
    out_b, lse_b = kernel(query, key, value, q_lengths=n_new, kv_lengths=n_new, causal=True,
                          scale=scale)
    context = merge_partials(out_a, lse_a, out_b, lse_b, sinks)  # [b, T, N, H] float32
    return jnp.where(valid[:, :, None, None], context, 0.0).astype(query.dtype)

  operands = (query, k_old, v_old, key, value, start, n_new, valid, sinks)
  if mesh is None:
    return local(*operands)
  q_spec = logical_to_spec(axes.query, rules, mesh, query.shape)  # (batch, length, heads, None)
  kv_spec = logical_to_spec(axes.key, rules, mesh, key.shape)
  batch, heads, kv_heads = q_spec[0], q_spec[2], kv_spec[2]
  if kv_heads != heads:
    # K/V heads not split like the query heads (e.g. 2 kv heads on tensor=4): every shard
    # keeps all heads of its rows rather than repeating K/V per query head.
    heads = kv_heads = None
  rows = P(batch)
  in_specs = (P(batch, None, heads, None), P(batch, None, kv_heads, None),
              P(batch, None, kv_heads, None), P(batch, None, kv_heads, None),
              P(batch, None, kv_heads, None), rows, rows, P(batch, None),
              None if sinks is None else P(heads))
  fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(batch, None, heads, None),
                     check_vma=False)
  return fn(*operands)
