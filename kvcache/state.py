"""LinearStateCache: the per-slot recurrent state of a linear-attention layer.

A linear-attention layer (layers/linear) needs, per sequence, only a state of
fixed size instead of its keys and values. The cache owns, as `nnx.Cache`
variables,
  kv       [B, K, Hk, Hv] float32: sum_s gamma^(t-s) phi(k_s) v_s^T,
  norm     [B, K, Hk] float32: sum_s gamma^(t-s) phi(k_s),
  lengths  [B] int32: tokens of each slot so far (the next token's position),
  rejected int32: rejection bits of the last step (see `step_checks`),
so a decode step reads B * K * Hk * Hv numbers whatever the sequence length.
The state is kept in float32 whatever the activations' dtype: it is a running
sum over the whole sequence.

Slots behave as the KV caches' do: every slot is its own sequence; `reset`
forgets one; `insert` copies a slot from another LinearStateCache (a prefill
cache into a decode cache); a prefill continues a slot from its state; a step
the cache cannot serve (slot out of range or named twice, a sequence past
max_length, left padding) is rejected with nothing changed: eagerly it raises
`StepRejected`, under jit the layer gates its writes and the host raises
after the step (`serving.jit_step`). max_length bounds positions as in the KV
caches (RoPE, and the slots of a hybrid model's softmax layers), not memory.

Sharding: the state is placed by logical names, batch by `cache_batch` and kv
heads by `cache_heads` (the names of the KV caches' `axis_names`), so a
tensor-parallel mesh splits the state by kv heads as it splits K/V.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from meshattn.kvcache.base import CACHE_AXIS_NAMES, CacheBase


class LinearStateCache(CacheBase):
  """Recurrent state of causal linear attention for `batch_size` sequences.

  CacheBase gives the slots, `lengths`, `rejected`, placement and the step checks; no
  ring buffer (`window` None: the state covers the whole sequence) and no quantization
  (`quant` None: float32 running sums)."""

  entry_dims = ("num_kv_heads", "head_dim", "value_dim")  # a state [K, Hk, Hv] per slot

  def __init__(self, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int,
               value_dim: int | None = None, *, mesh: jax.sharding.Mesh | None = None,
               rules=(), axis_names: Sequence[str] = CACHE_AXIS_NAMES):
    super().__init__(batch_size, max_length, num_kv_heads, head_dim, mesh=mesh, rules=rules,
                     axis_names=axis_names)
    self.value_dim = value_dim or head_dim
    batch_name, _, heads_name, dim_name = self.axis_names
    kv_names = (batch_name, heads_name, dim_name, None)  # [B, K, Hk, Hv]
    norm_names = (batch_name, heads_name, dim_name)  # [B, K, Hk]
    self.kv = nnx.Cache(self.place(
        jnp.zeros((batch_size, num_kv_heads, head_dim, self.value_dim), jnp.float32), kv_names),
        logical_axes=kv_names)
    self.norm = nnx.Cache(self.place(
        jnp.zeros((batch_size, num_kv_heads, head_dim), jnp.float32), norm_names),
        logical_axes=norm_names)

  @property
  def bytes_per_slot(self) -> int:
    """State bytes of one sequence, whatever its length (kv and norm, float32)."""
    return 4 * self.num_kv_heads * self.head_dim * (self.value_dim + 1)

  # ---- reading and writing (inside a step) ------------------------------------------

  def read(self, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(kv [b, K, Hk, Hv], norm [b, K, Hk]) of slots rows [b] (clipped into range: a step
    with a row out of range is rejected and writes nothing)."""
    safe = jnp.clip(rows, 0, self.batch_size - 1)
    return self.kv[...][safe], self.norm[...][safe]

  def write(self, rows: jax.Array, kv: jax.Array, norm: jax.Array, written: jax.Array,
            new_lengths: jax.Array) -> None:
    """Store the states kv [b, K, Hk, Hv], norm [b, K, Hk] of slots rows [b] where
    `written` [b]; lengths become new_lengths [b]. Rows out of range are dropped."""
    index = jnp.where(written, rows, self.batch_size)  # [b]; batch_size = dropped
    self.kv[...] = self.kv[...].at[index].set(kv.astype(jnp.float32), mode="drop")
    self.norm[...] = self.norm[...].at[index].set(norm.astype(jnp.float32), mode="drop")
    self.lengths[...] = self.lengths[...].at[index].set(new_lengths, mode="drop")

  # ---- slot management (host side, between steps) -----------------------------------

  def reset(self, slot) -> None:
    """Forget the sequence in `slot` (int or int array): its state to zeros, length 0."""
    rows = jnp.asarray(self.gate_traced_rows(
        self.check_slots(slot, "slot", who="LinearStateCache.reset")), jnp.int32)
    self.kv[...] = self.kv[...].at[rows].set(0.0, mode="drop")
    self.norm[...] = self.norm[...].at[rows].set(0.0, mode="drop")
    self.lengths[...] = self.lengths[...].at[rows].set(0, mode="drop")

  def clear_freed(self, freed: jax.Array, released: jax.Array) -> None:
    """Forget the slots in `released` [S] bool (state to zeros, length 0): the serving
    engine's release of a finished request, traced with the paged caches' `clear_freed` in
    one compiled call. A state has no pages, so `freed` [P] is not read."""
    del freed
    keep = ~jnp.asarray(released, bool)  # [S]
    self.kv[...] = jnp.where(keep[:, None, None, None], self.kv[...], 0.0)  # [S, K, Hk, Hv]
    self.norm[...] = jnp.where(keep[:, None, None], self.norm[...], 0.0)  # [S, K, Hk]
    self.lengths[...] = jnp.where(keep, self.lengths[...], 0)  # [S]

  def insert(self, slot, source: "LinearStateCache", source_slot=0) -> None:
    """Copy the sequence in `source_slot` of `source` (a LinearStateCache, e.g. one
    prefilled apart) into `slot` of this cache; the slot's previous sequence is dropped."""
    if not isinstance(source, LinearStateCache):
      raise ValueError(f"insert: a LinearStateCache takes its state from another "
                       f"LinearStateCache, got {type(source).__name__}")
    rows, src_rows, src_len = self.check_insert_rows(slot, source, source_slot)  # [b] each
    self.check_room(rows, src_len)
    kv, norm = source.read(src_rows)
    self.write(rows, kv, norm, jnp.ones(rows.shape, bool), src_len)
