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
empty; kernels mask on positions, so a slot never sees stale entries. Outside
a ring, a slot's entries at or past its length are zeros (created zeroed;
`reset` and `insert` clear the slot; writes land below the new length and
never for padding tokens or rejected steps; tests/kvcache/test_zero_past_length.py):
the chunked prefill's cuDNN pass reads the cache in place and relies on it.

A step the cache cannot serve is rejected with nothing changed (see
`step_checks`): eagerly it raises `StepRejected`; under jit it gates its
writes, records the reason in `rejected` and the host raises after the step.
Writes that would land out of range are dropped, never wrapped onto other data.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshattn.configs.vocabulary import CACHE_DIMS, is_axis_permutation
from meshattn.kvcache.quant import (
    KVQuant, dequantize, from_cache_basis, quantize, scales_by_token, to_cache_basis)
from meshattn.kvcache import variable_arrays
from meshattn.kvcache.step_checks import is_concrete
from meshattn.kvcache.base import CACHE_AXIS_NAMES, KVCacheBase, rows_or_past_end
from meshattn.kvcache.views import ContiguousView



# Writes of at least this many tokens per row (a prefill), for at most this many rows, take
# one slice write per row instead of a scatter of single tokens (KVCache._run_write). On the
# H200 the scatter moves a token's K or V in ~8 ns, a slice write costs a launch (~3 us)
# plus copy speed: the slices win from a few hundred tokens a row; the rows are unrolled
# into the program, so their count is bounded.
_RUN_MIN_TOKENS = 512
_RUN_MAX_ROWS = 64


def _check_axis_order(axis_order: Sequence[int]) -> tuple[int, ...]:
  order = tuple(int(a) for a in axis_order)
  if not is_axis_permutation(order):
    raise ValueError(f"cache axis order {order}: must be a permutation of (0, 1, 2, 3) "
                     f"over ({', '.join(CACHE_DIMS)})")
  return order


def raise_if(condition: jax.Array, message_fn) -> None:
  """Raise ValueError(message_fn()) now if `condition` is concrete and holds anywhere.

  For host-side (eager) operations; traced steps use `step_checks` instead.
  """
  if is_concrete(condition) and bool(np.any(np.asarray(condition))):
    raise ValueError(message_fn())


@functools.partial(jax.jit, static_argnames=("batch_axis", "by_slices"), donate_argnums=(0, 1, 2, 3))
def _clear_rows(key, value, lengths, scales, rows, *, batch_axis: int, by_slices: bool):
  """Zero the K/V of slots rows [b], set their scales to 1 and lengths to 0: one dispatch.

  `by_slices` (rows checked on the host, the cache on one device): one in-place slice
  write per row, which moves only the rows' bytes at copy speed; XLA's scatter of whole
  slots ran at ~6% of copy bandwidth on the H200 (8 slots of a 64 MiB cache: 0.24 ms per
  array). Otherwise the scatter: it drops an out-of-range traced row (a negative one too)
  instead of clamping it onto the last slot as a slice write would, and on a mesh it stays local to each shard
  where a slice at a dynamic slot would make XLA's partitioner gather the batch.
  """
  if by_slices:
    def clear(array, fill, axis):  # array with the batch at `axis`
      row = jnp.full(array.shape[:axis] + (1,) + array.shape[axis + 1:], fill, array.dtype)
      for i in range(rows.shape[0]):  # unrolled: b is static
        array = jax.lax.dynamic_update_slice_in_dim(array, row, rows[i], axis)
        # Kept apart: fused, XLA computes the b writes as one pass over the whole cache.
        array = jax.lax.optimization_barrier(array)
      return array
    key, value = clear(key, 0, batch_axis), clear(value, 0, batch_axis)
    scales = tuple(clear(s, 1.0, 0) for s in scales)  # [B, K or 1, C]
  else:
    # A negative index would wrap onto the last slots: send every row out of range past the
    # end, where the scatter drops it.
    rows = rows_or_past_end(rows, lengths.shape[0])  # [b]
    where = tuple(rows if a == batch_axis else slice(None) for a in range(key.ndim))
    key = key.at[where].set(0, mode="drop")
    value = value.at[where].set(0, mode="drop")
    scales = tuple(s.at[rows].set(1.0, mode="drop") for s in scales)
  return key, value, lengths.at[rows].set(0, mode="drop"), scales


class KVCache(KVCacheBase):
  """Contiguous (or ring-buffer) KV cache for `batch_size` sequences."""

  slots_are_rows = True

  def __init__(self, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, *,
               dtype=jnp.float32, axis_order: Sequence[int] = (0, 1, 2, 3),
               window: int | None = None, quant: KVQuant | None = None,
               mesh: jax.sharding.Mesh | None = None, rules=(),
               axis_names: Sequence[str] = CACHE_AXIS_NAMES):
    super().__init__(batch_size, max_length, num_kv_heads, head_dim, dtype=dtype, quant=quant,
                     mesh=mesh, rules=rules, axis_names=axis_names)
    self.axis_order = _check_axis_order(axis_order)
    self.window = window
    self.capacity = min(window, max_length) if window else max_length
    logical_shape = (batch_size, self.capacity, num_kv_heads, head_dim)
    storage_shape = tuple(logical_shape[a] for a in self.axis_order)
    storage_names = tuple(self.axis_names[a] for a in self.axis_order)
    self.key = nnx.Cache(self.place(jnp.zeros(storage_shape, self.storage_dtype), storage_names),
                         logical_axes=storage_names)
    self.value = nnx.Cache(self.place(jnp.zeros(storage_shape, self.storage_dtype), storage_names),
                           logical_axes=storage_names)
    if quant:
      scale_shape = (batch_size, quant.scale_shape(num_kv_heads), self.capacity)
      scale_names = (self.axis_names[0], self.axis_names[2] if quant.axis == "dkv" else None,
                     self.axis_names[1])
      self.key_scale = nnx.Cache(self.place(jnp.ones(scale_shape, jnp.float32), scale_names),
                                 logical_axes=scale_names)
      self.value_scale = nnx.Cache(self.place(jnp.ones(scale_shape, jnp.float32), scale_names),
                                   logical_axes=scale_names)

  # ---- the decode kernels' view --------------------------------------------------

  def decode_view(self, rows: jax.Array, new_lengths: jax.Array, *,
                  all_slots: bool) -> ContiguousView:
    """The cache as a decode kernel reads it after a step wrote slots rows [b] up to
    new_lengths [b]: every slot as stored (never gathered by rows), length 0 for the slots
    the step does not use unless `all_slots` (rows = 0..B-1); a ring buffer is read whole."""
    if all_slots:
      lengths = new_lengths  # [B]
    else:
      selected = jnp.zeros((self.batch_size,), bool).at[rows].set(True, mode="drop")  # [B]
      lengths = jnp.where(selected, self.lengths[...], 0)  # [B]
    if self.window:
      lengths = jnp.minimum(lengths, self.capacity)
    names = self.axis_names
    scale_names = (names[0], names[2] if self.quant and self.quant.axis == "dkv" else None,
                   names[1])
    return ContiguousView(
        key=self.logical_view(self.key[...]), value=self.logical_view(self.value[...]),
        lengths=lengths,
        key_scale=self.key_scale[...] if self.quant else None,  # [B, K or 1, C]
        value_scale=self.value_scale[...] if self.quant else None,
        axes=(("key", names), ("value", names), ("lengths", names[:1]),
              ("key_scale", scale_names), ("value_scale", scale_names)),
        batch_name=names[0], heads_name=names[2], holds_window=bool(self.window))

  # ---- layout helpers ----------------------------------------------------------

  def logical_view(self, stored: jax.Array) -> jax.Array:
    """Storage layout -> [B, C, K, H] (free for the default order; a transpose otherwise)."""
    return jnp.transpose(stored, np.argsort(self.axis_order))

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
      block = self.logical_view(block)  # [B, size, K, H]
      if rows is not None:
        block = block[rows]
      if self.quant:
        scales = jax.lax.dynamic_slice_in_dim(getattr(self, scale)[...], start, size, axis=2)
        if rows is not None:
          scales = scales[rows]
        block = dequantize(block, scales_by_token(scales), dtype)  # scales [b, K or 1, size]
      out.append(block.astype(dtype))
    return out[0], out[1]

  # ---- writing ---------------------------------------------------------------

  def _scatter(self, stored: jax.Array, updates: jax.Array, rows: jax.Array, index: jax.Array):
    """stored (storage layout) <- updates [b, T, K, H] at (rows[b], index[b, t]), in place.

    One scatter of the b*T written entries (index == capacity is dropped): the
    rest of the cache is neither read nor copied, so with the buffer donated
    a decode step moves one token per row.
    """
    batch_axis, seq_axis = self.axis_order.index(0), self.axis_order.index(1)
    rest = [a for a in self.axis_order if a > 1]  # kv heads / head_dim in storage order
    upd = jnp.transpose(updates, (0, 1, *rest)).astype(stored.dtype)  # [b, T, rest...]
    where = [slice(None)] * stored.ndim
    where[batch_axis] = rows[:, None]  # [b, 1]
    where[seq_axis] = index  # [b, T]
    if abs(batch_axis - seq_axis) == 1:
      # Adjacent advanced indices put their broadcast (b, T) where the first of them is.
      first = min(batch_axis, seq_axis)
      upd = jnp.moveaxis(upd, (0, 1), (first, first + 1))
    return stored.at[tuple(where)].set(upd, mode="drop")

  def _run_plan(self, rows: jax.Array, start: jax.Array, keep: jax.Array, t: int):
    """Where each row's slice write of T entries goes (shared by K and V): (slots [b],
    window_start [b], taken [b, T] the token at each window entry, keep [b, T] by window
    entry). A window that would pass the end is moved back to end at the capacity
    (s = min(start, C - T)) and the tokens shifted into it; a row out of range writes
    slot 0's entries back as they are."""
    in_range = (rows >= 0) & (rows < self.batch_size)  # [b]
    slots = jnp.where(in_range, rows, 0)  # [b]
    window_start = jnp.clip(start, 0, self.capacity - t)  # [b]
    # Window entry j of row i holds token j - shift[i] (a gather along T: the same shift as
    # a concatenate + dynamic slice gave wrong entries under XLA:GPU, jax 0.11).
    token = jnp.arange(t)[None, :] - (start - window_start)[:, None]  # [b, T]
    taken = jnp.clip(token, 0, t - 1)  # [b, T]
    keep = ((token >= 0) & (token < t) & in_range[:, None]
            & jnp.take_along_axis(keep, taken, axis=1))  # [b, T]
    return slots, window_start, taken, keep

  def _run_write(self, stored: jax.Array, updates: jax.Array, plan) -> jax.Array:
    """stored (storage layout) <- updates [b, T, K, H] by `plan` (_run_plan): one in-place
    slice write of T entries per row.

    XLA's scatter of b*T single tokens ran at ~6% of copy bandwidth on the H200 (a
    4096-token prefill of 8 slots: 0.26 ms per array); slice writes moved the same bytes
    in about half the time of the scatters, window reads included (2026-12-04). Each row's
    window is read and written back with the kept tokens in it, so dropped tokens
    (padding, a rejected step, a row out of range) leave their entries as they were.
    """
    slots, window_start, taken, keep = plan
    t = updates.shape[1]
    seq_axis, batch_axis = self.axis_order.index(1), self.axis_order.index(0)
    rest = [a for a in self.axis_order if a > 1]  # kv heads / head_dim in storage order
    upd = jnp.transpose(updates, (0, 1, *rest)).astype(stored.dtype)  # [b, T, rest...]
    upd = jnp.take_along_axis(upd, taken.reshape(taken.shape + (1,) * (upd.ndim - 2)),
                              axis=1)  # [b, T, rest...] by window entry
    sizes = list(stored.shape)
    sizes[batch_axis], sizes[seq_axis] = 1, t
    for i in range(slots.shape[0]):  # unrolled: b is static
      starts = [0] * stored.ndim
      starts[batch_axis], starts[seq_axis] = slots[i], window_start[i]
      old = jax.lax.dynamic_slice(stored, starts, sizes)  # storage layout, batch 1, T entries
      new = jnp.moveaxis(upd[i][None], (0, 1), (batch_axis, seq_axis))  # as `old`
      mask = keep[i].reshape([t if a == seq_axis else 1 for a in range(stored.ndim)])
      stored = jax.lax.dynamic_update_slice(stored, jnp.where(mask, new, old), starts)
      # Kept apart: fused, XLA computes the b writes as one pass over the whole cache.
      stored = jax.lax.optimization_barrier(stored)
    return stored

  def _on_one_device(self, stored: jax.Array) -> bool:
    """Whether the cache array lives on one device. A slice write at a dynamic slot of a
    batch sharded over a mesh would make XLA's partitioner gather the cache (the scatter
    stays local to each shard); under a trace, the cache's mesh says."""
    if isinstance(stored, jax.core.Tracer):
      return self.mesh is None or self.mesh.size == 1
    return len(stored.sharding.device_set) == 1

  def _writes_runs(self, stored: jax.Array, rows: int, length: int) -> bool:
    """Whether a write of `length` tokens to each of `rows` rows takes the slice-write path:
    a long prefill of not too many rows (a decode token's scatter is already one small
    kernel), no ring (its entries wrap), one device."""
    return (not self.window and _RUN_MIN_TOKENS <= length <= self.capacity
            and rows <= _RUN_MAX_ROWS and self._on_one_device(stored))

  def write(self, rows: jax.Array, key: jax.Array, value: jax.Array, positions: jax.Array,
            valid: jax.Array, new_lengths: jax.Array, *, run: bool = False) -> None:
    """Store key/value [b, T, K, H] of tokens at `positions` [b, T] into slots `rows` [b].

    Only tokens with `valid` [b, T] are written, and in a ring only those that
    are still within the window of `new_lengths` [b] (a token further back
    would overwrite a newer one). `run`: the caller promises each row's
    positions are consecutive (positions[b, t] = positions[b, 0] + t, as a step's
    are), which lets a long write take one slice write per row.
    """
    rows = rows_or_past_end(rows, self.batch_size)  # [b]; a negative row must not wrap
    keep = valid & (positions >= 0) & (rows < self.batch_size)[:, None]  # [b, T]
    if self.window:
      keep = keep & (positions >= new_lengths[:, None] - self.capacity)
    index = jnp.where(keep, positions % self.capacity if self.window else positions,
                      self.capacity)  # [b, T]; capacity = dropped
    if self.quant:
      key, key_scale = quantize(key, self.quant)
      value, value_scale = quantize(value, self.quant)
      self.key_scale[...] = self._scatter_scale(self.key_scale[...], key_scale, rows, index)
      self.value_scale[...] = self._scatter_scale(self.value_scale[...], value_scale, rows, index)
    if run and self._writes_runs(self.key[...], *positions.shape):
      plan = self._run_plan(rows, positions[:, 0], keep, positions.shape[1])
      self.key[...] = self._run_write(self.key[...], key, plan)
      self.value[...] = self._run_write(self.value[...], value, plan)
    else:
      self.key[...] = self._scatter(self.key[...], key, rows, index)
      self.value[...] = self._scatter(self.value[...], value, rows, index)
    self.lengths[...] = self.lengths[...].at[rows].set(new_lengths, mode="drop")

  @staticmethod
  def _scatter_scale(stored, updates, rows, index):
    """stored [B, K or 1, C] <- updates [b, T, K or 1] at (rows[b], index[b, t]), in place."""
    return stored.at[rows[:, None], :, index].set(updates, mode="drop")

  # ---- slot management ---------------------------------------------------------

  def reset(self, slot) -> None:
    """Forget the sequence in `slot` (int or int array) and clear its entries.

    The length goes to 0 and the slot's K/V to zeros (scales to 1): kernels
    never read past a length, and clearing means a NaN or a secret of the
    previous occupant cannot survive into the next one at all.
    """
    # Host ints stay on the host for the check (a device array would make it wait for the
    # steps in flight) and travel with the one dispatch that clears the rows in place; the
    # arrays move in and out without the Variables' hooks (~0.1 ms of host time per call).
    rows = self.gate_traced_rows(self.check_slots(slot, "slot", who="KVCache.reset"))  # [b]
    key = variable_arrays.read(self.key)
    by_slices = isinstance(rows, np.ndarray) and self._on_one_device(key)
    rows = rows.astype(np.int32) if isinstance(rows, np.ndarray) else rows.astype(jnp.int32)
    variables = [self.key, self.value, self.lengths]
    scales = [self.key_scale, self.value_scale] if self.quant else []
    new = _clear_rows(key, *(variable_arrays.read(v) for v in variables[1:]),
                      tuple(variable_arrays.read(v) for v in scales), rows,
                      batch_axis=self.axis_order.index(0), by_slices=by_slices)
    for variable, array in zip(variables + scales, new[:3] + new[3]):
      variable_arrays.replace(variable, array)  # the old buffers were donated

  def insert(self, slot, source: "KVCache", source_slot=0) -> None:
    """Copy the sequence in `source_slot` of `source` into `slot` of this cache.

    Layout, quantization and ring capacity may differ (entries are moved by
    position and requantized if needed); the source must fit max_length.
    """
    rows, src_rows, src_len = self.check_insert_rows(slot, source, source_slot)  # [b] each
    self.check_room(rows, src_len)
    # Read before the reset: the source may be this cache (a slot copied onto itself).
    key, value = source.read_block(src_rows, 0, source.capacity, self.dtype)  # [b, Cs, K, H]
    # From the source's basis to this cache's (rotated iff quantized, see kvcache.quant).
    key, value = (to_cache_basis(from_cache_basis(x, source.quant), self.quant) for x in (key, value))
    positions = source.entry_positions(src_len)  # [b, Cs]
    self.reset(rows)  # nothing of the slot's previous sequence survives past the inserted one
    self.write_in_place(rows, key, value, positions, positions >= 0, src_len)
