"""KVCache: the per-layer key/value cache for prefill and autoregressive decoding.

The cache owns, as `nnx.Cache` variables,
  key, value    [B, C, K, H] permuted by `axis_order` (the memory layout),
                int8/int4 when quantized, with
  key_scale, value_scale [B, K or 1, C] float32 scales, head-major: each
                head's scales contiguous over the tokens, as the ragged
                decode kernels read them;
  lengths       [B] int32: tokens written to each slot so far, i.e. the
                position of that slot's next token.
C (capacity) is max_length, or the sliding window for a ring buffer: a
sliding-window layer never needs more than its last `window` keys, so its
memory is bounded by the window, not by max_length. Entry j of a ring holds
the most recent token whose position p has p % window == j.

Every slot is its own sequence (ragged batch). Positions of the cached
entries are derived from `lengths`, and an entry whose position is -1 is
empty; kernels mask on positions, so a slot never sees stale entries.

Errors are raised before anything changes: eagerly as ValueError when the
lengths are concrete, and inside jit through a host callback whose failure
aborts the step (functional state updates are then never applied). Writes
that would land out of range are dropped, never wrapped onto other data.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshattn.kvcache.quant import KVQuant, dequantize, quantize, scales_by_token

CACHE_AXIS_NAMES = ("cache_batch", "cache_sequence", "cache_heads", "cache_kv")


def _check_axis_order(axis_order: Sequence[int]) -> tuple[int, ...]:
  order = tuple(int(a) for a in axis_order)
  if sorted(order) != [0, 1, 2, 3]:
    raise ValueError(f"cache axis order {order}: must be a permutation of (0, 1, 2, 3) "
                     "over (batch, sequence, kv heads, head_dim)")
  return order


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


@functools.cache
def _host_callbacks_available() -> bool:
  """Host callbacks need a CPU device, absent when JAX_PLATFORMS excludes cpu."""
  try:
    return bool(jax.devices("cpu"))
  except RuntimeError:
    return False


def raise_if(condition: jax.Array, message_fn) -> None:
  """Raise ValueError(message_fn(*values)) if `condition` holds.

  Eager: checked now. Traced: checked on the host when the step runs, which
  aborts the step before its state updates are applied.
  """
  if _is_concrete(condition):
    if bool(np.any(np.asarray(condition))):
      raise ValueError(message_fn())
    return

  if not _host_callbacks_available():
    return  # no CPU backend (JAX_PLATFORMS without cpu): out-of-range writes are still dropped

  def check(flag):
    if flag:
      raise ValueError(message_fn())

  # A replicated scalar: the host callback then needs no gather of a sharded array.
  jax.debug.callback(check, jnp.any(condition))


class KVCache(nnx.Module):
  """Contiguous (or ring-buffer) KV cache for `batch_size` sequences."""

  def __init__(self, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, *,
               dtype=jnp.float32, axis_order: Sequence[int] = (0, 1, 2, 3),
               window: int | None = None, quant: KVQuant | None = None,
               mesh: jax.sharding.Mesh | None = None, rules=(),
               axis_names: Sequence[str] = CACHE_AXIS_NAMES):
    if batch_size < 1 or max_length < 1:
      raise ValueError(f"KVCache needs batch_size >= 1 and max_length >= 1, got {batch_size}, {max_length}")
    self.batch_size = batch_size
    self.max_length = max_length
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.dtype = dtype
    self.axis_order = _check_axis_order(axis_order)
    self.window = window
    self.capacity = min(window, max_length) if window else max_length
    self.quant = quant
    self.mesh = mesh
    self.rules = tuple(rules)
    self.axis_names = tuple(axis_names)
    logical_shape = (batch_size, self.capacity, num_kv_heads, head_dim)
    storage_shape = tuple(logical_shape[a] for a in self.axis_order)
    storage_names = tuple(self.axis_names[a] for a in self.axis_order)
    store_dtype = quant.storage_dtype if quant else dtype
    self.key = nnx.Cache(self._place(jnp.zeros(storage_shape, store_dtype), storage_names),
                         logical_axes=storage_names)
    self.value = nnx.Cache(self._place(jnp.zeros(storage_shape, store_dtype), storage_names),
                           logical_axes=storage_names)
    if quant:
      scale_shape = (batch_size, quant.scale_shape(num_kv_heads), self.capacity)
      scale_names = (self.axis_names[0], self.axis_names[2] if quant.axis == "dkv" else None,
                     self.axis_names[1])
      self.key_scale = nnx.Cache(self._place(jnp.ones(scale_shape, jnp.float32), scale_names),
                                 logical_axes=scale_names)
      self.value_scale = nnx.Cache(self._place(jnp.ones(scale_shape, jnp.float32), scale_names),
                                   logical_axes=scale_names)
    self.lengths = nnx.Cache(self._place(jnp.zeros((batch_size,), jnp.int32), self.axis_names[:1]),
                             logical_axes=self.axis_names[:1])

  # ---- placement -------------------------------------------------------------

  def _place(self, x: jax.Array, names) -> jax.Array:
    if self.mesh is None:
      return x
    from meshattn.sharding import logical_to_sharding
    return jax.device_put(x, logical_to_sharding(names, self.mesh, self.rules, x.shape))

  # ---- layout helpers ----------------------------------------------------------

  def _to_logical(self, stored: jax.Array) -> jax.Array:
    """Storage layout -> [B, C, K, H]."""
    return jnp.transpose(stored, np.argsort(self.axis_order))

  @property
  def bytes_per_token(self) -> float:
    """Cache bytes per cached token per sequence (K and V, scales included)."""
    if self.quant:
      values = 2 * self.num_kv_heads * self.head_dim * self.quant.bits / 8
      return values + 2 * self.quant.scale_shape(self.num_kv_heads) * 4
    return 2 * self.num_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize

  # ---- positions -------------------------------------------------------------

  def entry_positions(self, lengths: jax.Array) -> jax.Array:
    """Token position held by each entry, [B, C] (-1 = empty), for slot lengths [B]."""
    j = jnp.arange(self.capacity, dtype=jnp.int32)[None, :]  # [1, C]
    n = lengths[:, None]  # [B, 1]
    if not self.window:
      return jnp.where(j < n, j, -1)
    # Ring: the newest position p < n with p % C == j.
    newest = j + self.capacity * ((n - 1 - j) // self.capacity)
    return jnp.where(j < n, newest, -1)

  # ---- reading ---------------------------------------------------------------

  def block_size(self, preferred: int = 512) -> int:
    """Largest divisor of the capacity that is <= preferred (blocks tile exactly)."""
    for size in range(min(preferred, self.capacity), 0, -1):
      if self.capacity % size == 0:
        return size
    return self.capacity

  def read_block(self, rows: jax.Array | None, start, size: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Entries [start, start+size) of the given rows, dequantized: K, V [b, size, K, H].

    Only this block is materialised in `dtype`, never the whole cache.
    """
    seq_axis = self.axis_order.index(1)
    out = []
    for stored, scale in ((self.key, "key_scale"), (self.value, "value_scale")):
      block = jax.lax.dynamic_slice_in_dim(stored[...], start, size, axis=seq_axis)
      block = self._to_logical(block)  # [B, size, K, H]
      if rows is not None:
        block = block[rows]
      if self.quant:
        scales = jax.lax.dynamic_slice_in_dim(getattr(self, scale)[...], start, size, axis=2)
        if rows is not None:
          scales = scales[rows]
        block = dequantize(block, scales_by_token(scales), dtype)  # scales [b, K or 1, size]
      out.append(block.astype(dtype))
    return out[0], out[1]

  def read_all(self, dtype) -> tuple[jax.Array, jax.Array]:
    """The whole cache as K, V [B, C, K, H] (tests and inspection)."""
    return self.read_block(None, 0, self.capacity, dtype)

  # ---- writing ---------------------------------------------------------------

  def _scatter(self, stored: jax.Array, updates: jax.Array, rows: jax.Array, index: jax.Array):
    """stored (storage layout) <- updates [b, T, ...rest] at (rows[b], index[b, t]).

    `updates` is in logical order over the stored array's axes; index entries
    == capacity are dropped.
    """
    batch_axis = self.axis_order.index(0)
    row_order = [a for a in self.axis_order if a != 0]

    def write_row(row, upd, idx):
      upd = jnp.transpose(upd, [a - 1 for a in row_order])
      where = tuple(idx if a == 1 else slice(None) for a in row_order)
      return row.at[where].set(upd.astype(row.dtype), mode="drop")

    selected = jnp.take(stored, rows, axis=batch_axis)
    written = jax.vmap(write_row, in_axes=(batch_axis, 0, 0), out_axes=batch_axis)(
        selected, updates, index)
    where = tuple(rows if a == batch_axis else slice(None) for a in range(stored.ndim))
    return stored.at[where].set(written)

  def write(self, rows: jax.Array, key: jax.Array, value: jax.Array, positions: jax.Array,
            valid: jax.Array, new_lengths: jax.Array) -> None:
    """Store key/value [b, T, K, H] of tokens at `positions` [b, T] into slots `rows` [b].

    Only tokens with `valid` [b, T] are written, and in a ring only those that
    are still within the window of `new_lengths` [b] (a token further back
    would overwrite a newer one).
    """
    keep = valid & (positions >= 0)
    if self.window:
      keep = keep & (positions >= new_lengths[:, None] - self.capacity)
    index = jnp.where(keep, positions % self.capacity if self.window else positions,
                      self.capacity)  # [b, T]; capacity = dropped
    if self.quant:
      key, key_scale = quantize(key, self.quant)
      value, value_scale = quantize(value, self.quant)
      self.key_scale[...] = self._scatter_scale(self.key_scale[...], key_scale, rows, index)
      self.value_scale[...] = self._scatter_scale(self.value_scale[...], value_scale, rows, index)
    self.key[...] = self._scatter(self.key[...], key, rows, index)
    self.value[...] = self._scatter(self.value[...], value, rows, index)
    self.lengths[...] = self.lengths[...].at[rows].set(new_lengths)

  @staticmethod
  def _scatter_scale(stored, updates, rows, index):
    """stored [B, K or 1, C] <- updates [b, T, K or 1] at (rows[b], index[b, t])."""
    def write_row(row, upd, idx):  # [K or 1, C], [T, K or 1], [T]
      return row.at[:, idx].set(upd.T, mode="drop")

    written = jax.vmap(write_row)(stored[rows], updates, index)
    return stored.at[rows].set(written)

  # ---- slot management ---------------------------------------------------------

  def check_slots(self, rows: jax.Array) -> None:
    raise_if((rows < 0) | (rows >= self.batch_size),
             lambda: f"KVCache: slot index out of range; slots must be in [0, {self.batch_size})")

  def check_room(self, rows: jax.Array, new_lengths: jax.Array) -> None:
    raise_if(new_lengths > self.max_length,
             lambda: f"KVCache: a sequence would grow past max_length={self.max_length} "
                     f"(slots {np.asarray(rows).tolist() if _is_concrete(rows) else '...'}); "
                     "reset the slot or build the cache with a larger max_length")

  def reset(self, slot) -> None:
    """Forget the sequence in `slot` (int or int array); its entries read as empty."""
    rows = jnp.atleast_1d(jnp.asarray(slot, jnp.int32))
    self.check_slots(rows)
    self.lengths[...] = self.lengths[...].at[rows].set(0)

  def insert(self, slot, source: "KVCache", source_slot=0) -> None:
    """Copy the sequence in `source_slot` of `source` into `slot` of this cache.

    Layout, quantization and ring capacity may differ (entries are moved by
    position and requantized if needed); the source must fit max_length.
    """
    if (source.num_kv_heads, source.head_dim) != (self.num_kv_heads, self.head_dim):
      raise ValueError(f"insert: source cache has K={source.num_kv_heads}, H={source.head_dim}; "
                       f"this cache K={self.num_kv_heads}, H={self.head_dim}")
    rows = jnp.atleast_1d(jnp.asarray(slot, jnp.int32))
    src_rows = jnp.atleast_1d(jnp.asarray(source_slot, jnp.int32))
    self.check_slots(rows)
    source.check_slots(src_rows)
    src_len = source.lengths[...][src_rows]  # [b]
    self.check_room(rows, src_len)
    key, value = source.read_block(src_rows, 0, source.capacity, self.dtype)  # [b, Cs, K, H]
    positions = source.entry_positions(src_len)  # [b, Cs]
    self.write(rows, key, value, positions, positions >= 0, src_len)
