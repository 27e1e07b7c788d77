"""One prefill or decode step against a KVCache: attend, then write.

The step's queries attend over what the cache held before the step plus the
step's own keys/values (so a chunk never reads entries it is about to
overwrite in a ring buffer), and only then are the new tokens written.

Fresh prompts: when every row's slot is empty before the step, the step's
tokens are positions 0..T-1 and attend only over themselves, which is
train-mode attention over the prompt; a caller may then pass a
`fresh_attention` (e.g. a flash kernel) that `cached_step` runs instead of
the blockwise pass over the whole cache capacity. The write is the same
either way, so the cache ends in the same state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp

from meshattn.kvcache.cache import KVCache
from meshattn.layers.kernels.cached import attend_with_cache
from meshattn.layers.kernels.dot_product import KernelOptions
from meshattn.layers.kernels.sharded import sharded_decode_call
from meshattn.layers.masks import structural_mask

logger = logging.getLogger("meshattn.kernels")

# (query [b, T, N, H], key, value [b, T, K, H], valid [b, T]) -> context [b, T, N, H]
StepAttention = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
# (query [b, T, N, H], key, value [b, C, K, H], mask [b, 1, T, C], q_positions [b, T],
#  kv_positions [b, C]) -> context [b, T, N, H]
SlotAttention = Callable[..., jax.Array]


def step_positions(cache: KVCache, rows: jax.Array, length: int) -> jax.Array:
  """Positions [b, T] the step's tokens take in their sequences."""
  start = cache.lengths[...][rows]  # [b]
  return start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]


def cached_step(cache: KVCache, rows: jax.Array, query: jax.Array, key: jax.Array,
                value: jax.Array, *, positions: jax.Array, valid: jax.Array,
                options: KernelOptions, sinks: jax.Array | None = None,
                fresh_attention: StepAttention | None = None,
                slot_attention: SlotAttention | None = None) -> jax.Array:
  """Attend query [b, T, N, H] over cache rows + key/value [b, T, K, H]; then store them.

  positions [b, T] from `step_positions`; valid [b, T]: real tokens, a
  prefix of each row (right padding). Returns the context [b, T, N, H];
  padding queries give zeros.

  fresh_attention(query, key, value, valid), if given, is used instead when
  every row's slot is empty before the step (then positions are 0..T-1 and
  the cache holds nothing to read); it must give the same context. The
  choice needs no host sync: eagerly it is made on the concrete lengths,
  under jit by `lax.cond` (both branches compiled, one run). A fresh
  attention whose kernel refuses these inputs (ValueError while tracing,
  e.g. a length it cannot tile) is dropped for the reference path.

  slot_attention(query, key, value, mask, q_positions, kv_positions), if
  given and the cache is no ring buffer, replaces the block-by-block pass
  for a step on non-empty slots: the step's tokens are written first, then
  the queries attend over the whole slot [b, C] in one call of a tiled train
  kernel (flash on GPU) under the explicit mask [b, 1, T, C] that positions,
  the structural mask and emptiness give. A ring buffer keeps the read-then-
  write order (a chunk may overwrite entries its own first queries need).

  The caller has checked the step (`step_checks`) and cleared `valid` if it
  was rejected, so a rejected step writes nothing and keeps every length.
  """
  start = cache.lengths[...][rows]  # [b]
  new_lengths = start + jnp.sum(valid, axis=1, dtype=jnp.int32)  # [b]
  operands = (query, key, value, valid)
  if slot_attention is not None and not cache.window:
    cache.write(rows, key, value, positions, valid, new_lengths)

    def over_slot(query, key, value, valid):
      k_all, v_all = cache.read_block(rows, 0, cache.capacity, query.dtype)  # [b, C, K, H]
      entry_pos = cache.entry_positions(new_lengths)  # [b, C], -1 = empty
      allowed = structural_mask(options.mask, positions, entry_pos) & valid[:, :, None]  # [b, T, C]
      context = slot_attention(query, k_all, v_all, allowed[:, None], positions, entry_pos)
      return jnp.where(valid[:, :, None, None], context, 0.0).astype(query.dtype)  # [b, T, N, H]

    return _fresh_or_cached(jnp.all(start == 0), fresh_attention, over_slot, operands)
  block = cache.block_size()

  def over_cache(query, key, value, valid):
    entry_pos_all = cache.entry_positions(start)  # [b, C]

    def read_block(i):
      k, v = cache.read_block(rows, i * block, block, query.dtype)  # [b, block, K, H]
      pos = jax.lax.dynamic_slice_in_dim(entry_pos_all, i * block, block, axis=1)  # [b, block]
      return k, v, pos

    new_positions = jnp.where(valid, positions, -1)  # [b, T]
    return attend_with_cache(
        query, key, value, options=options, q_positions=positions, q_valid=valid,
        new_positions=new_positions, read_block=read_block, num_blocks=cache.capacity // block,
        sinks=sinks)  # [b, T, N, H]

  context = _fresh_or_cached(jnp.all(start == 0), fresh_attention, over_cache, operands)
  cache.write(rows, key, value, positions, valid, new_lengths)
  return context


def _fresh_or_cached(all_fresh: jax.Array, fresh: StepAttention | None, cached: StepAttention,
                     operands: tuple[jax.Array, ...]) -> jax.Array:
  """fresh(*operands) if all_fresh else cached(*operands), without a host sync under jit.

  A fresh kernel that refuses the operands (ValueError / NotImplementedError
  while tracing: a shape it cannot tile) falls back to cached; an error of
  the cached path itself is raised again by that fallback.
  """
  eager = not isinstance(all_fresh, jax.core.Tracer)
  # Eagerly a non-fresh step never touches the fresh kernel (not even to trace it).
  if fresh is None or (eager and not bool(all_fresh)):
    return cached(*operands)
  try:
    if eager:
      return fresh(*operands)
    return jax.lax.cond(all_fresh, fresh, cached, *operands)
  except (ValueError, NotImplementedError) as err:
    logger.info("fresh-prompt prefill kernel refused the inputs (%s); using the cached path", err)
    return cached(*operands)


def decode_with_kernel(cache, rows: jax.Array, query: jax.Array, key: jax.Array, value: jax.Array, *,
                       positions: jax.Array, valid: jax.Array, options: KernelOptions,
                       sinks: jax.Array | None, kernel, paged: bool, all_slots: bool = False,
                       mesh=None, rules=(), axes=None) -> jax.Array:
  """One decode step through a ragged / paged decode kernel: write, then attend.

  query [b, 1, N, H], key/value [b, 1, K, H]; rows [b] the slots (checked by
  the caller, `valid` cleared if the step was rejected). The token is written
  first, so row b attends over its entries [0, new_length) and the kernel
  reads only those. A ring buffer holds exactly the window after the write,
  so it is read whole (min(length, window) entries, no window mask).

  The contiguous cache is handed to the kernel as it is stored, never
  gathered by rows: with `all_slots` (rows = 0..B-1) directly; otherwise the
  queries are scattered into a [B, N, H] batch whose other rows have length
  0 (the kernels skip them) and the outputs gathered back. Returns [b, 1, N, H].
  """
  start = cache.lengths[...][rows]  # [b]
  new_lengths = start + jnp.sum(valid, axis=1, dtype=jnp.int32)  # [b]
  cache.write(rows, key, value, positions, valid, new_lengths)
  quant = cache.quant is not None
  shared = dict(scale=options.scale, soft_cap=options.soft_cap, sinks=sinks)
  q = query[:, 0]  # [b, N, H]
  if paged:
    pool = dict(key_pages=cache.key_pages[...], value_pages=cache.value_pages[...],
                key_scale=cache.key_scale[...] if quant else None,
                value_scale=cache.value_scale[...] if quant else None,  # [P, tpp, K, H]
                page_owner=cache.page_owner[...])  # [P]: kernels read only the row's own pages
    batched = dict(page_table=cache.page_table[...][rows], lengths=new_lengths,  # [b, M], [b]
                   slots=rows)  # [b]
  else:
    if not all_slots:
      selected = jnp.zeros((cache.batch_size,), bool).at[rows].set(True, mode="drop")  # [B]
      q = jnp.zeros((cache.batch_size,) + q.shape[1:], q.dtype).at[rows].set(q, mode="drop")
    lengths = jnp.where(selected, cache.lengths[...], 0) if not all_slots else new_lengths  # [B]
    shared["window"] = options.mask.window if options.mask.attention_type == "local_sliding" else None
    if cache.window:
      lengths, shared["window"] = jnp.minimum(lengths, cache.capacity), None
    pool = {}
    batched = dict(key=cache.logical_view(cache.key[...]),  # [B, C, K, H]
                   value=cache.logical_view(cache.value[...]),  # [B, C, K, H]
                   lengths=lengths,
                   key_scale=cache.key_scale[...] if quant else None,  # [B, K or 1, C]
                   value_scale=cache.value_scale[...] if quant else None)
  if mesh is not None:
    out = sharded_decode_call(kernel, mesh, rules, axes, q, batch_args=batched,
                              pool_args=pool, shared_args=shared)  # [B or b, N, H]
  else:
    out = kernel(q, **batched, **pool, **shared)  # [B or b, N, H]
  if not paged and not all_slots:
    out = out[jnp.clip(rows, 0, cache.batch_size - 1)]  # [b, N, H]
  out = jnp.where(valid[:, 0, None, None], out, 0.0)  # rows that wrote nothing output zeros
  return out[:, None].astype(query.dtype)
