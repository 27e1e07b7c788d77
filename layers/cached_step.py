"""One prefill or decode step against a KVCache: attend, then write.

The step's queries attend over what the cache held before the step plus the
step's own keys/values (so a chunk never reads entries it is about to
overwrite in a ring buffer), and only then are the new tokens written.

Chunks continuing their slots: where exact and a partial kernel serves
(prefill_split.py: cuDNN on the GPU), the chunk is written, then attends over
the slot's earlier entries and over itself in two flash passes merged by
their log-sum-exps; elsewhere, with a tiled train kernel, over the whole slot
under an explicit mask (prefill_attention.py); else block by block.

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
from meshattn.layers.kernels import dispatch
from meshattn.layers.kernels.decode.cached import attend_with_cache
from meshattn.layers.kernels.api import KernelOptions
from meshattn.layers.kernels.sharded import sharded_decode_call
from meshattn.layers.linear.steps import linear_cached_step
from meshattn.layers.masks import structural_mask
from meshattn.layers.prefill_attention import fresh_prompt_attention, whole_slot_attention
from meshattn.layers.prefill_split import split_chunk_attention

logger = logging.getLogger("meshattn.kernels")

# (query [b, T, N, H], key, value [b, T, K, H], valid [b, T]) -> context [b, T, N, H]
StepAttention = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
# (query [b, T, N, H], key, value [b, C, K, H], mask [b, 1, T, C], q_positions [b, T],
#  kv_positions [b, C]) -> context [b, T, N, H]
SlotAttention = Callable[..., jax.Array]
# (cache, rows [b], query [b, T, N, H], key, value [b, T, K, H], start [b], valid [b, T])
#  -> context [b, T, N, H] (prefill_split.split_chunk_attention)
SplitAttention = Callable[..., jax.Array]


def step_positions(cache: KVCache, rows: jax.Array, length: int) -> jax.Array:
  """Positions [b, T] the step's tokens take in their sequences."""
  start = cache.lengths[...][rows]  # [b]
  return start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]


def cached_step(cache: KVCache, rows: jax.Array, query: jax.Array, key: jax.Array,
                value: jax.Array, *, positions: jax.Array, valid: jax.Array,
                options: KernelOptions, sinks: jax.Array | None = None,
                fresh_attention: StepAttention | None = None,
                slot_attention: SlotAttention | None = None,
                split_attention: SplitAttention | None = None) -> jax.Array:
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

  split_attention(cache, rows, query, key, value, start, valid), if given and
  the cache is no ring buffer, is used instead of slot_attention: the step's
  tokens are written, then the queries attend over the slot's first `start`
  entries and over the step's own key/value, merged exactly (prefill_split).

  The caller has checked the step (`step_checks`) and cleared `valid` if it
  was rejected, so a rejected step writes nothing and keeps every length.
  """
  start = cache.lengths[...][rows]  # [b]
  new_lengths = start + jnp.sum(valid, axis=1, dtype=jnp.int32)  # [b]
  operands = (query, key, value, valid)
  if split_attention is not None and not cache.window:
    cache.write(rows, key, value, positions, valid, new_lengths, run=True)

    def over_split(query, key, value, valid):
      return split_attention(cache, rows, query, key, value, start, valid)  # [b, T, N, H]

    return _fresh_or_cached(jnp.all(start == 0), fresh_attention, over_split, operands)
  if slot_attention is not None and not cache.window:
    cache.write(rows, key, value, positions, valid, new_lengths, run=True)

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
  cache.write(rows, key, value, positions, valid, new_lengths, run=True)
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
                       sinks: jax.Array | None, kernel, all_slots: bool = False,
                       mesh=None, rules=(), axes=None) -> jax.Array:
  """One decode step through a decode-protocol kernel (kernels/api.py): write, then attend.

  query [b, 1, N, H], key/value [b, 1, K, H]; rows [b] the slots (checked by
  the caller, `valid` cleared if the step was rejected). The token is written
  first, so row b attends over its entries [0, new_length) and the kernel
  reads only those, through the cache's view of itself (`cache.decode_view`:
  contiguous or paged, kvcache/views.py). A ring buffer holds exactly the
  window after the write, so it is read whole (no window mask).

  A view whose rows are cache slots (`by_slot`: the contiguous cache, handed
  over as stored, never gathered by rows) takes the queries directly with
  `all_slots` (rows = 0..B-1); otherwise they are scattered into a [B, N, H]
  batch whose other rows have length 0 (the kernels skip them) and the
  outputs gathered back. Returns [b, 1, N, H].
  """
  start = cache.lengths[...][rows]  # [b]
  new_lengths = start + jnp.sum(valid, axis=1, dtype=jnp.int32)  # [b]
  cache.write(rows, key, value, positions, valid, new_lengths, run=True)
  view = cache.decode_view(rows, new_lengths, all_slots=all_slots)
  shared = dict(scale=options.scale, soft_cap=options.soft_cap, sinks=sinks,
                **view.static_args(options))
  q = query[:, 0]  # [b, N, H]
  scattered = view.by_slot and not all_slots
  if scattered:
    q = jnp.zeros((cache.batch_size,) + q.shape[1:], q.dtype).at[rows].set(q, mode="drop")  # [B, N, H]
  if mesh is not None:
    out = sharded_decode_call(kernel, mesh, rules, axes, q, view, shared_args=shared)  # [B or b, N, H]
  else:
    out = kernel(q, **view.arrays(), **shared)  # [B or b, N, H]
  if scattered:
    out = out[jnp.clip(rows, 0, cache.batch_size - 1)]  # [b, N, H]
  out = jnp.where(valid[:, 0, None, None], out, 0.0)  # rows that wrote nothing output zeros
  return out[:, None].astype(query.dtype)


def cached_attention(layer, cache, plan, query: jax.Array, key: jax.Array, value: jax.Array, *,
                     positions: jax.Array, model_mode: str, axes, sinks: jax.Array | None,
                     padded: bool) -> jax.Array:
  """The context [b, T, N, H] of a prefill / autoregressive step of `layer` over `cache`.

  plan: the checked step (step_inputs.plan_step); query [b, T, N, H], key/value
  [b, T, K, H] in the cache's basis; positions [b, T] from `step_positions`; padded:
  the call gave segment ids (right padding). A linear-attention layer continues each
  slot's recurrent state (LinearStateCache, layers/linear). Decode runs the registry's decode kernel
  when it picks one (else the reference cached step); prefill runs in chunks of
  prefill_chunk_size with chunked prefill, the first chunk of a fresh prompt through
  the train kernel, and chunks continuing their slots through the split path
  (prefill_split) or else a tiled kernel over the whole slot (prefill_attention)
  where one serves.
  """
  s = layer.settings
  if s.linear is not None:  # a linear-attention layer continues each slot's state
    return linear_cached_step(cache, plan.rows, query, key, value, valid=plan.valid,
                              spec=s.linear, scale=s.scale, precision=s.precision,
                              mesh=layer.mesh, rules=s.logical_axis_rules, axes=axes)
  options = dispatch.kernel_options(s)
  if model_mode == "autoregressive":
    kernel = dispatch.decode_kernel(s, cache)
    if kernel is not None:
      return decode_with_kernel(
          cache, plan.rows, query, key, value, positions=positions, valid=plan.valid,
          options=options, sinks=sinks, kernel=kernel, all_slots=plan.all_slots,
          mesh=layer.mesh, rules=s.logical_axis_rules, axes=axes)
  length = query.shape[1]
  chunk = s.prefill_chunk_size if model_mode == "prefill" and s.use_chunked_prefill else length
  # A prompt on empty slots is train-mode attention over itself: the first
  # chunk may run the train kernel (flash on GPU/TPU) instead of the
  # blockwise pass over the whole cache (see cached_step).
  first = min(chunk, length)
  fresh = (fresh_prompt_attention(layer, axes, padded=padded, sinks=sinks, length=first)
           if model_mode == "prefill" else None)
  split = (split_chunk_attention(layer, cache, axes, sinks=sinks, all_slots=plan.all_slots)
           if model_mode == "prefill" else None)
  slot = (whole_slot_attention(layer, axes, sinks=sinks, lengths=(first, cache.capacity))
          if model_mode == "prefill" and split is None else None)
  contexts = []
  for start in range(0, length, chunk):
    part = slice(start, min(start + chunk, length))
    contexts.append(cached_step(
        cache, plan.rows, query[:, part], key[:, part], value[:, part],
        positions=positions[:, part], valid=plan.valid[:, part], options=options, sinks=sinks,
        fresh_attention=fresh if start == 0 else None, slot_attention=slot,
        split_attention=split))  # [b, chunk, N, H]
  return jnp.concatenate(contexts, axis=1) if len(contexts) > 1 else contexts[0]
