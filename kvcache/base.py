"""What every cache kind shares: slots, lengths, the rejection bits, placement, the step checks.

    CacheBase            slots of sequences: lengths, rejected, placement, the checks
      KVCacheBase        + keys / values: dtype, quantization, bytes per token, read_all
        KVCache          contiguous (or ring buffer), cache.py
        PagedKVCache     a page pool shared by the slots, paged.py
      (a recurrent-state cache derives CacheBase directly)

A kind calls `super().__init__(...)` first (it checks the sizes and creates `lengths` [B]
and `rejected`), then creates its own arrays with `self.place(array, logical_names)`, and
implements:
  write(rows, ...) / its reads            the step's writes and reads of its own arrays;
  reset(slot), insert(slot, source, source_slot)   slot management (host side), every
                                          slot argument read through `check_slots`;
  step_conditions(rows, new_lengths)      super()'s conditions plus its own (pages, ...);
  rejection_detail(rows, new_lengths)     optional: words for its own rejection bits;
and, if decode kernels read it, `kernel_features` (the registry features its kind needs,
e.g. "paged_kv") and `decode_view(rows, new_lengths, all_slots=)` (kvcache/views.py).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshattn.kvcache.graph_epoch import TracksGraph
from meshattn.kvcache.step_checks import (
    Rejection, explain, fold, is_concrete, raise_now, slot_ids)

# Logical names of a cache's [batch, sequence, kv heads, head_dim] dimensions (the rules
# in configs/base.yml map them to mesh axes).
CACHE_AXIS_NAMES = ("cache_batch", "cache_sequence", "cache_heads", "cache_kv")


def rows_or_past_end(rows: jax.Array, size: int) -> jax.Array:
  """rows [b] with every row outside [0, size) replaced by `size`, which a mode="drop"
  update drops (a negative index would otherwise wrap onto the last slots)."""
  return jnp.where((rows >= 0) & (rows < size), rows, size)


class CacheBase(TracksGraph, nnx.Module):
  """Per-slot sequences for `batch_size` slots of up to `max_length` tokens."""

  window: int | None = None  # a ring buffer's size (KVCache); None: every position kept
  quant = None  # kvcache.quant.KVQuant where the kind stores quantized values
  # What this kind asks of a decode kernel (registry features): nothing beyond the call's.
  kernel_features: frozenset[str] = frozenset()

  def __init__(self, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, *,
               mesh: jax.sharding.Mesh | None = None, rules=(),
               axis_names: Sequence[str] = CACHE_AXIS_NAMES):
    if batch_size < 1 or max_length < 1:
      raise ValueError(f"{type(self).__name__} needs batch_size >= 1 and max_length >= 1, "
                       f"got {batch_size}, {max_length}")
    if len(axis_names) != 4:
      raise ValueError(f"axis_names {tuple(axis_names)}: need 4 (batch, sequence, kv heads, "
                       "head_dim), as cache_axis_names")
    self.batch_size = batch_size
    self.max_length = max_length
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.mesh = mesh
    self.rules = tuple(rules)
    self.axis_names = tuple(axis_names)
    batch_name = self.axis_names[0]
    self.lengths = nnx.Cache(self.place(jnp.zeros((batch_size,), jnp.int32), (batch_name,)),
                             logical_axes=(batch_name,))  # [B]: the next token's position
    # Rejection bits of the last step (0 = served); replicated, so every process can read it.
    self.rejected = nnx.Cache(self.place(jnp.zeros((), jnp.int32), ()), logical_axes=())

  # ---- placement -------------------------------------------------------------

  def place(self, x, names) -> jax.Array:
    """x (a jax or NumPy array) as a global array sharded by its logical `names` and the
    cache's rules over its mesh (as is without a mesh)."""
    if self.mesh is None:
      return jnp.asarray(x)
    from meshattn.sharding import logical_to_sharding  # pylint: disable=import-outside-toplevel
    return jax.device_put(x, logical_to_sharding(names, self.mesh, self.rules, x.shape))

  # ---- step checks -------------------------------------------------------------

  def step_conditions(self, rows: jax.Array, new_lengths: jax.Array) -> dict[Rejection, jax.Array]:
    """What would reject a step writing slots rows [b] up to new_lengths [b] (see step_checks):
    a slot out of range, or a sequence past max_length."""
    return {Rejection.SLOT_OUT_OF_RANGE: (rows < 0) | (rows >= self.batch_size),
            Rejection.PAST_MAX_LENGTH: new_lengths > self.max_length}

  def rejection_detail(self, rows=None, new_lengths=None) -> dict[Rejection, str]:
    """Words for the rejection message, per bit, where the step's values are concrete."""
    del new_lengths
    if rows is not None and is_concrete(rows):
      return {Rejection.PAST_MAX_LENGTH: f"slots {np.asarray(rows).tolist()}"}
    return {}

  def explain(self, bits: int, rows=None, new_lengths=None) -> str:
    """The message of rejection `bits` (step_checks.explain), naming this kind."""
    return explain(bits, batch_size=self.batch_size, max_length=self.max_length,
                   kind=type(self).__name__, detail=self.rejection_detail(rows, new_lengths))

  def check_slots(self, slots, name: str = "slots", *, who: str | None = None,
                  distinct: bool = False):
    """`slots` (an int or ints) checked as slot ids of this cache and returned flat [n]
    (step_checks.slot_ids: integers only, in [0, batch_size), with `distinct` none named
    twice; NumPy when concrete, a traced array as is). Every host-side slot argument of
    every kind comes through here; errors name `name` and `who` (default: the kind)."""
    return slot_ids(slots, self.batch_size, name=name, who=who or type(self).__name__,
                    distinct=distinct)

  def gate_traced_rows(self, rows):
    """Rows [b] from check_slots. Traced (a reset inside a compiled step), they cannot raise:
    a row out of range makes the call change nothing (every row moved past the end, where
    the scatters drop it) and records SLOT_OUT_OF_RANGE, which the host raises after the
    step as for a refused step. Concrete rows were checked already and pass through."""
    if isinstance(rows, np.ndarray):
      return rows
    bad = jnp.any((rows < 0) | (rows >= self.batch_size))
    self.rejected[...] = self.rejected[...] | jnp.where(
        bad, int(Rejection.SLOT_OUT_OF_RANGE), 0).astype(jnp.int32)
    return jnp.where(bad, self.batch_size, rows)

  # What one slot's entry holds, named: an inserted sequence must come in the same shape.
  entry_dims = ("num_kv_heads", "head_dim")

  def check_insert_rows(self, slot, source: "CacheBase", source_slot):
    """What every kind's `insert` checks first, before any change: a source whose entries
    have this cache's shape, one source slot per slot, both in range, and no slot named
    twice (two sequences into one slot would leave the longer one's tail past the shorter
    one's length). Returns rows and src_rows (int32 [b], checked) and the source slots'
    lengths [b]."""
    who = f"{type(self).__name__}.insert"
    ours = {name: getattr(self, name) for name in self.entry_dims}
    theirs = {name: getattr(source, name, None) for name in self.entry_dims}
    if theirs != ours:
      raise ValueError(f"{who}: the source {type(source).__name__} has {theirs}; this cache "
                       f"{ours}")
    rows = self.check_slots(slot, "slot", who=who, distinct=True)
    src_rows = source.check_slots(source_slot, "source_slot", who=who)
    if src_rows.shape != rows.shape:
      raise ValueError(f"{who}: {rows.shape[0]} slots but {src_rows.shape[0]} source slots; "
                       "slot and source_slot must name as many")
    rows, src_rows = jnp.asarray(rows, jnp.int32), jnp.asarray(src_rows, jnp.int32)  # [b]
    return rows, src_rows, source.lengths[...][src_rows]

  def check_room(self, rows: jax.Array, new_lengths: jax.Array) -> None:
    """Raise StepRejected now if concrete new_lengths [b] of slots rows [b] do not fit."""
    bits = fold(self.step_conditions(rows, new_lengths))
    raise_now(bits, lambda b: self.explain(b, rows, new_lengths))


class KVCacheBase(CacheBase):
  """A cache of keys and values (`dtype`, or `quant`'s storage dtype with float32 scales)."""

  # Whether its K/V arrays hold the slots as rows, entry j of a slot at row index j (outside
  # a ring): then a step over every slot can read them as stored (prefill_split) and holds
  # zeros past each slot's length. A page pool gathers its slots through the page table.
  slots_are_rows: bool = False

  def __init__(self, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, *,
               dtype=jnp.float32, quant=None, mesh: jax.sharding.Mesh | None = None, rules=(),
               axis_names: Sequence[str] = CACHE_AXIS_NAMES):
    super().__init__(batch_size, max_length, num_kv_heads, head_dim, mesh=mesh, rules=rules,
                     axis_names=axis_names)
    self.dtype = dtype
    self.quant = quant

  @property
  def storage_dtype(self):
    """The dtype K/V are stored in."""
    return self.quant.storage_dtype if self.quant else self.dtype

  @property
  def bytes_per_token(self) -> float:
    """Cache bytes per cached token per sequence (K and V, scales included)."""
    if self.quant:
      values = 2 * self.num_kv_heads * self.head_dim * self.quant.bits / 8
      return values + 2 * self.quant.scale_shape(self.num_kv_heads) * 4
    return 2 * self.num_kv_heads * self.head_dim * jnp.dtype(self.dtype).itemsize

  def write_in_place(self, rows, key, value, positions, valid, new_lengths) -> None:
    """`write`, compiled with the cache donated, for host-side calls between steps
    (`insert`): an eager write would build a new cache array beside the old one, a second
    cache's worth of device memory for the moment. Under an outer trace the caller's jit
    decides."""
    _write_donated(self, rows, key, value, positions, valid, new_lengths)

  def read_block(self, rows, start, size: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Entries [start, start+size) of the given rows (None: all), dequantized: K, V
    [b, size, K, H] (each kind implements it)."""
    raise NotImplementedError

  def read_all(self, dtype) -> tuple[jax.Array, jax.Array]:
    """Every slot's entries as K, V [B, C, K, H] (tests and inspection)."""
    return self.read_block(None, 0, self.capacity, dtype)


@nnx.jit(donate_argnums=0)
def _write_donated(cache, rows, key, value, positions, valid, new_lengths):
  cache.write(rows, key, value, positions, valid, new_lengths)
