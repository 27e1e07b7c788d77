"""One prefill or decode step against a KVCache: attend, then write.

The step's queries attend over what the cache held before the step plus the
step's own keys/values (so a chunk never reads entries it is about to
overwrite in a ring buffer), and only then are the new tokens written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meshattn.kvcache.cache import KVCache
from meshattn.layers.kernels.cached import attend_with_cache
from meshattn.layers.kernels.dot_product import KernelOptions


def step_positions(cache: KVCache, rows: jax.Array, length: int) -> jax.Array:
  """Positions [b, T] the step's tokens take in their sequences."""
  start = cache.lengths[...][rows]  # [b]
  return start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]


def cached_step(cache: KVCache, rows: jax.Array, query: jax.Array, key: jax.Array,
                value: jax.Array, *, positions: jax.Array, valid: jax.Array,
                options: KernelOptions, sinks: jax.Array | None = None) -> jax.Array:
  """Attend query [b, T, N, H] over cache rows + key/value [b, T, K, H]; then store them.

  positions [b, T] from `step_positions`; valid [b, T]: real tokens, a
  prefix of each row (right padding). Returns the context [b, T, N, H];
  padding queries give zeros.
  """
  cache.check_slots(rows)
  start = cache.lengths[...][rows]  # [b]
  new_lengths = start + jnp.sum(valid, axis=1, dtype=jnp.int32)  # [b]
  cache.check_room(rows, new_lengths)
  lengths_before = cache.lengths[...][rows]
  entry_pos_all = cache.entry_positions(lengths_before)  # [b, C]
  block = cache.block_size()

  def read_block(i):
    k, v = cache.read_block(rows, i * block, block, query.dtype)  # [b, block, K, H]
    pos = jax.lax.dynamic_slice_in_dim(entry_pos_all, i * block, block, axis=1)  # [b, block]
    return k, v, pos

  new_positions = jnp.where(valid, positions, -1)  # [b, T]
  context = attend_with_cache(
      query, key, value, options=options, q_positions=positions, q_valid=valid,
      new_positions=new_positions, read_block=read_block, num_blocks=cache.capacity // block,
      sinks=sinks)
  cache.write(rows, key, value, positions, valid, new_lengths)
  return context
