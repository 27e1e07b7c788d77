"""PagedKVCache: a KV cache whose memory is a pool of fixed-size pages shared by all slots.

A contiguous `KVCache` reserves max_length entries for every slot, so memory
is sized for the longest possible sequence times the batch. Here the K/V live
in one pool of `num_pages` pages of `tokens_per_page` tokens, and each slot
owns only the pages its sequence needs so far: short and long sequences share
the same memory, and a finished sequence's pages go back to the pool at once.

State (`nnx.Cache` variables, so `nnx.jit` carries it like KVCache's):
  key_pages, value_pages  [P, tokens_per_page, K, H], int8/int4 when
                          quantized, with key_scale, value_scale
                          [P, tokens_per_page, K or 1] float32;
  page_table              [B, max_pages_per_sequence] int32: page holding
                          logical entries [i*tpp, (i+1)*tpp) of a slot
                          (-1 = none);
  page_owner              [P] int32: slot owning each page (-1 = free);
  lengths                 [B] int32, as in KVCache.
Logical entry j of a slot is position j of its sequence (no ring buffer:
`window` is None), stored at page page_table[slot, j // tpp], offset
j % tpp.

Like KVCache it derives kvcache/base.py's KVCacheBase (lengths, rejection
bits, placement, the step checks) and has the same reading / writing
interface (`block_size`, `entry_positions`, `read_block`, `write`, `reset`,
`insert`, `capacity`, ...), so `cached_step` / `attend_with_cache` use it
unchanged: one block is one page. No ring buffer (`window` is None). Decode
kernels read it through its `decode_view` (kvcache/views.py PagedView).

Pages are handed out by a host-side page manager (`reserve`,
`reserve_for_step`, `free`, `num_free_pages`, `pages_of`) that runs eagerly,
outside jit, between steps: allocation is a data-dependent, variable-size
decision that belongs to the serving loop's scheduler, and the tables it
touches are tiny. The policy itself (which pages a slot gets, what freeing
releases) is kvcache/page_plan.py, shared with the serving engine's host
tables; `clear_freed` is the device side of freeing, shared likewise.
Inside a step nothing is allocated; `check_room` fails the step (before any
state changes, like KVCache) if a token would land in a page that was not
reserved, and `write` drops such tokens rather than writing them anywhere.

Isolation: a page freed by one sequence and reused by another must never
leak the first sequence's K/V. Two independent defences:
  1. `read_block` returns zeros for every entry whose page is not owned (per
     `page_owner`) by the reading slot, so even a corrupt page table or a
     masking bug cannot expose another sequence's data;
  2. `free` zeroes the freed pages' K/V (and resets their scales), so stale
     data does not survive in the pool at all.
`write` likewise only writes into pages the written slot owns.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshattn.kvcache import page_plan, variable_arrays
from meshattn.kvcache.base import CACHE_AXIS_NAMES, KVCacheBase, rows_or_past_end
from meshattn.kvcache.cache import raise_if
from meshattn.kvcache.step_checks import Rejection, is_concrete
from meshattn.kvcache.quant import KVQuant, dequantize, from_cache_basis, quantize, to_cache_basis
from meshattn.kvcache.views import PagedView
from meshattn.sharding.multihost import host_copy


class PagedKVCache(KVCacheBase):
  """Paged KV cache for `batch_size` slots of up to `max_length` tokens over a shared page pool."""

  def __init__(self, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, *,
               num_pages: int, tokens_per_page: int, dtype=jnp.float32,
               quant: KVQuant | None = None, mesh: jax.sharding.Mesh | None = None, rules=(),
               axis_names: Sequence[str] = CACHE_AXIS_NAMES):
    if num_pages < 1 or tokens_per_page < 1:
      raise ValueError(f"PagedKVCache needs num_pages >= 1 and tokens_per_page >= 1, "
                       f"got {num_pages}, {tokens_per_page}")
    super().__init__(batch_size, max_length, num_kv_heads, head_dim, dtype=dtype, quant=quant,
                     mesh=mesh, rules=rules, axis_names=axis_names)
    self.num_pages = num_pages
    self.tokens_per_page = tokens_per_page
    self.max_pages_per_sequence = math.ceil(max_length / tokens_per_page)
    # Per-slot logical capacity: whole pages, so blocks (= pages) tile it exactly.
    self.capacity = self.max_pages_per_sequence * tokens_per_page
    batch_name, _, heads_name, kv_name = self.axis_names
    # Pages are shared by every slot, so the page axis is never sharded by batch;
    # heads / head_dim shard as in the contiguous cache.
    self._pool_names = (None, None, heads_name, kv_name)
    self._table_names = (batch_name, None)
    self._owner_names = (None,)
    pool_shape = (num_pages, tokens_per_page, num_kv_heads, head_dim)
    self.key_pages = nnx.Cache(self.place(jnp.zeros(pool_shape, self.storage_dtype),
                                          self._pool_names), logical_axes=self._pool_names)
    self.value_pages = nnx.Cache(self.place(jnp.zeros(pool_shape, self.storage_dtype),
                                            self._pool_names), logical_axes=self._pool_names)
    if quant:
      scale_shape = (num_pages, tokens_per_page, quant.scale_shape(num_kv_heads))
      self._scale_names = (None, None, heads_name if quant.axis == "dkv" else None)
      self.key_scale = nnx.Cache(self.place(jnp.ones(scale_shape, jnp.float32), self._scale_names),
                                 logical_axes=self._scale_names)
      self.value_scale = nnx.Cache(self.place(jnp.ones(scale_shape, jnp.float32), self._scale_names),
                                   logical_axes=self._scale_names)
    self.page_table = nnx.Cache(
        self.place(jnp.full((batch_size, self.max_pages_per_sequence), -1, jnp.int32),
                   self._table_names), logical_axes=self._table_names)
    self.page_owner = nnx.Cache(self.place(jnp.full((num_pages,), -1, jnp.int32), self._owner_names),
                                logical_axes=self._owner_names)

  # ---- the decode kernels' view --------------------------------------------------

  # What this kind asks of a decode kernel: one that reads pages (registry feature).
  kernel_features: frozenset[str] = frozenset({"paged_kv"})

  def decode_view(self, rows: jax.Array, new_lengths: jax.Array, *,
                  all_slots: bool) -> PagedView:
    """The pool as a decode kernel reads it after a step wrote slots rows [b] up to
    new_lengths [b]: the rows' page tables, lengths and slots; the whole pool."""
    del all_slots  # rows index the kernel's batch either way
    batch_name = self._table_names[0]
    return PagedView(
        key_pages=self.key_pages[...], value_pages=self.value_pages[...],  # [P, tpp, K, H]
        page_table=self.page_table[...][rows], lengths=new_lengths,  # [b, M], [b]
        page_owner=self.page_owner[...], slots=rows,  # [P], [b]
        key_scale=self.key_scale[...] if self.quant else None,  # [P, tpp, K or 1]
        value_scale=self.value_scale[...] if self.quant else None,
        axes=(("key_pages", self._pool_names), ("value_pages", self._pool_names),
              ("page_table", self._table_names), ("lengths", (batch_name,)),
              ("page_owner", self._owner_names), ("slots", (batch_name,)),
              ("key_scale", self._scale_names if self.quant else ()),
              ("value_scale", self._scale_names if self.quant else ())),
        batch_name=batch_name, heads_name=self._pool_names[2])

  # ---- positions -------------------------------------------------------------

  def entry_positions(self, lengths: jax.Array, rows: jax.Array | None = None) -> jax.Array:
    """Token position held by each logical entry, [b, C] (-1 = empty), for slot lengths [b].

    Entry j holds position j when j < length. `check_room` guarantees every
    position below a slot's length lies in a page the slot owns (lengths only
    grow after a checked step, and `free` zeroes the length), so lengths
    alone suffice for the duck-typed call in `cached_step`; pass `rows` to
    also mark entries in unallocated pages empty.
    """
    j = jnp.arange(self.capacity, dtype=jnp.int32)[None, :]  # [1, C]
    present = j < lengths[:, None]  # [b, C]
    if rows is not None:
      pages = self.page_table[...][rows]  # [b, M]
      present = present & jnp.repeat(pages >= 0, self.tokens_per_page, axis=1)  # [b, C]
    return jnp.where(present, j, -1)

  # ---- reading ---------------------------------------------------------------

  def block_size(self, preferred: int = 512) -> int:
    """One page per block: a block never straddles two pages. (`preferred` is ignored.)"""
    return self.tokens_per_page

  def _locate(self, rows: jax.Array, positions: jax.Array):
    """Pool coordinates of logical entries: positions [b, T] of slots rows [b].

    Returns (page [b, T] clamped to a valid id, offset [b, T], owned [b, T]),
    owned = the entry is in range and its page is allocated to and owned by
    that slot (the only entries a slot may read or write).
    """
    in_range = (positions >= 0) & (positions < self.capacity)  # [b, T]
    column = jnp.clip(positions // self.tokens_per_page, 0, self.max_pages_per_sequence - 1)
    table = self.page_table[...][rows]  # [b, M]
    page = jnp.take_along_axis(table, column, axis=1)  # [b, T]
    safe = jnp.maximum(page, 0)
    owned = in_range & (page >= 0) & (self.page_owner[...][safe] == rows[:, None])
    return safe, positions % self.tokens_per_page, owned

  def read_block(self, rows: jax.Array | None, start, size: int, dtype) -> tuple[jax.Array, jax.Array]:
    """Logical entries [start, start+size) of the given rows, dequantized: K, V [b, size, K, H].

    Entries are gathered through the page table (`start` may be traced, any
    alignment); only this block is materialised in `dtype`. Every entry whose
    page is unallocated or owned by another slot reads as zeros, so a page
    can never expose another sequence's data even if masking were wrong.
    """
    if rows is None:
      rows = jnp.arange(self.batch_size, dtype=jnp.int32)
    rows = jnp.asarray(rows, jnp.int32)
    positions = start + jnp.arange(size, dtype=jnp.int32)  # [size]
    positions = jnp.broadcast_to(positions[None, :], (rows.shape[0], size))  # [b, size]
    page, offset, owned = self._locate(rows, positions)  # [b, size] each
    out = []
    for pool, scale in ((self.key_pages, "key_scale"), (self.value_pages, "value_scale")):
      block = pool[...][page, offset]  # [b, size, K, H]
      if self.quant:
        block = dequantize(block, getattr(self, scale)[...][page, offset], dtype)  # scales [b, size, K|1]
      block = jnp.where(owned[:, :, None, None], block.astype(dtype), jnp.zeros((), dtype))
      out.append(block)  # [b, size, K, H]
    return out[0], out[1]

  # ---- writing ---------------------------------------------------------------

  def _scatter(self, pool: jax.Array, updates: jax.Array, flat: jax.Array) -> jax.Array:
    """pool [P, tpp, ...] <- updates [b, T, ...] at flat entry ids [b, T] (out of range dropped)."""
    rest = pool.shape[2:]
    flat_pool = pool.reshape((self.num_pages * self.tokens_per_page,) + rest)  # [P*tpp, ...]
    flat_pool = flat_pool.at[flat].set(updates.astype(pool.dtype), mode="drop")
    return flat_pool.reshape(pool.shape)

  def write(self, rows: jax.Array, key: jax.Array, value: jax.Array, positions: jax.Array,
            valid: jax.Array, new_lengths: jax.Array, *, run: bool = False) -> None:
    """Store key/value [b, T, K, H] of tokens at `positions` [b, T] into slots `rows` [b].

    Token p of a slot goes to page page_table[slot, p // tpp], offset
    p % tpp. Only tokens with `valid` [b, T] whose page the slot owns are
    written; the others are sent to an out-of-range index and dropped, never
    onto another page. Sets lengths[rows] = new_lengths [b]. (`run`, as for
    KVCache.write, changes nothing here: a slot's pages are not contiguous.)
    """
    del run
    rows = jnp.asarray(rows, jnp.int32)
    page, offset, owned = self._locate(rows, positions)  # [b, T] each
    keep = valid & owned
    dropped = self.num_pages * self.tokens_per_page
    flat = jnp.where(keep, page * self.tokens_per_page + offset, dropped)  # [b, T]
    if self.quant:
      key, key_scale = quantize(key, self.quant)  # [b, T, K, H], [b, T, K|1]
      value, value_scale = quantize(value, self.quant)
      self.key_scale[...] = self._scatter(self.key_scale[...], key_scale, flat)
      self.value_scale[...] = self._scatter(self.value_scale[...], value_scale, flat)
    self.key_pages[...] = self._scatter(self.key_pages[...], key, flat)
    self.value_pages[...] = self._scatter(self.value_pages[...], value, flat)
    # A negative row must not wrap onto the last slot.
    self.lengths[...] = self.lengths[...].at[rows_or_past_end(rows, self.batch_size)].set(
        new_lengths, mode="drop")

  # ---- step checks -----------------------------------------------------------

  def step_conditions(self, rows: jax.Array, new_lengths: jax.Array) -> dict[Rejection, jax.Array]:
    """What would reject a step writing slots rows [b] up to new_lengths [b] (see step_checks):
    a slot out of range, past max_length, or a token landing in a page it does not own."""
    safe_rows = jnp.clip(rows, 0, self.batch_size - 1)
    needed_pages = -(-new_lengths // self.tokens_per_page)  # [b] ceil
    column = jnp.arange(self.max_pages_per_sequence, dtype=jnp.int32)[None, :]  # [1, M]
    table = self.page_table[...][safe_rows]  # [b, M]
    owner = self.page_owner[...][jnp.maximum(table, 0)]  # [b, M]
    owned = (table >= 0) & (owner == safe_rows[:, None])  # [b, M]
    missing = (column < needed_pages[:, None]) & ~owned  # [b, M]
    return {**super().step_conditions(rows, new_lengths), Rejection.PAGES_NOT_RESERVED: missing}

  def rejection_detail(self, rows=None, new_lengths=None) -> dict[Rejection, str]:
    detail = super().rejection_detail(rows, new_lengths)
    if rows is not None and is_concrete(rows):
      lengths = ("" if new_lengths is None or not is_concrete(new_lengths)
                 else f", new lengths {np.asarray(new_lengths).tolist()}")
      detail[Rejection.PAGES_NOT_RESERVED] = (
          f"slots {np.asarray(rows).tolist()}{lengths}, {self.tokens_per_page} tokens per page")
    return detail

  # ---- page manager (host side, eager) ---------------------------------------

  def _host(self, name: str) -> np.ndarray:
    """A host copy of a table, the same on every process.

    The page manager runs in every process (they run the same program), so each
    needs the whole table; when it spans other processes' devices it is gathered
    (a collective every process joins, as it joins the step).
    """
    value = getattr(self, name)[...]
    if not is_concrete(value):
      raise ValueError(f"PagedKVCache.{name} is traced: reserve / free / insert manage pages on the "
                       "host and must be called outside jit, between steps")
    return host_copy(value)

  def _host_slots(self, slot, name: str, method: str, *, distinct: bool = False) -> np.ndarray:
    """Argument `name` of `method` as checked slot ids [n] (CacheBase.check_slots), which
    must be concrete: pages are managed on the host."""
    if not is_concrete(slot):
      raise ValueError(f"PagedKVCache.{method}: page management needs concrete {name} (call it "
                       "outside jit)")
    return self.check_slots(slot, name, who=f"PagedKVCache.{method}", distinct=distinct)

  def _allocate(self, owner: np.ndarray, table: np.ndarray, slots: np.ndarray, totals) -> bool:
    """page_plan.allocate with this cache's sizes (in place, all-or-nothing)."""
    return page_plan.allocate(owner, table, slots, totals, tokens_per_page=self.tokens_per_page,
                              max_length=self.max_length, who="PagedKVCache")

  def _store_tables(self, owner: np.ndarray, table: np.ndarray) -> None:
    # From NumPy straight to the global layout: every process holds the same tables.
    self.page_owner.set_value(self.place(np.asarray(owner, np.int32), self._owner_names))
    self.page_table.set_value(self.place(np.asarray(table, np.int32), self._table_names))

  def reserve(self, slot: int, num_tokens: int) -> None:
    """Make `slot` own enough pages for `num_tokens` tokens in total (idempotent; never shrinks).

    Free pages are taken lowest id first. Raises ValueError, with nothing
    changed, if the pool has too few free pages or num_tokens > max_length.
    """
    slots = self._host_slots(slot, "slot", "reserve")
    self._reserve_many(slots, _token_counts(num_tokens, "num_tokens", "reserve", len(slots)))

  def reserve_for_step(self, slots, tokens_per_row) -> None:
    """Reserve room for `tokens_per_row` (int or [b]) more tokens in each of `slots` [b].

    What a serving loop calls before a prefill / decode step: each slot gets
    pages for lengths[slot] + tokens. All slots are reserved or none is. A slot
    named twice is refused, as the step would refuse it.
    """
    slots = self._host_slots(slots, "slots", "reserve_for_step", distinct=True)
    lengths = self._host("lengths")
    tokens = _token_counts(tokens_per_row, "tokens_per_row", "reserve_for_step", len(slots))
    self._reserve_many(slots, lengths[slots] + tokens)

  def _reserve_many(self, slots: np.ndarray, totals) -> None:
    owner, table = self._host("page_owner"), self._host("page_table")
    if self._allocate(owner, table, slots, totals):
      self._store_tables(owner, table)

  def free(self, slot) -> None:
    """Return the pages of `slot` (int or ints) to the pool and forget its sequence.

    page_owner and the slot's page_table row go to -1, its length to 0, and
    the freed pages' K/V are zeroed (scales reset to 1) so the next owner
    cannot see them even if reads were not masked by ownership.
    """
    self._free(self._host_slots(slot, "slot", "free"))

  def _free(self, slots: np.ndarray) -> None:
    owner, table = self._host("page_owner"), self._host("page_table")
    freed = page_plan.release(owner, table, slots)  # [P]
    self._store_tables(owner, table)
    self._clear_now(freed, page_plan.released_mask(slots, self.batch_size))

  def _clear_now(self, freed: np.ndarray, released: np.ndarray) -> None:
    """clear_freed from the host: the masks placed like the tables, one compiled call of
    fixed shapes (the same program for every page count)."""
    self.clear_freed(self.place(freed, self._owner_names),  # [P]
                     self.place(released, (self._table_names[0],)))  # [S]

  def clear_freed(self, freed: jax.Array, released: jax.Array) -> None:
    """Zero the K/V of the pages in `freed` [P] bool (scales back to 1) and set the
    length of the slots in `released` [S] bool to 0: the device side of `free`.

    Runs eagerly (`free`) or traced (the engine writes every layer's tables and calls
    this in one compiled call); the tables themselves are the caller's to write.
    """
    scales = (self.key_scale, self.value_scale) if self.quant else ()
    # The pools are donated, so an eager free rewrites them in place: a copy would need a
    # second pool's worth of memory for the moment, which a pool sized to fill the device
    # does not have. (Under an outer trace the caller's jit decides.)
    pools, scale_values, lengths = _cleared(
        (variable_arrays.read(self.key_pages), variable_arrays.read(self.value_pages)),
        tuple(variable_arrays.read(s) for s in scales), variable_arrays.read(self.lengths),
        freed, released)
    for variable, value in zip((self.key_pages, self.value_pages, *scales, self.lengths),
                               (*pools, *scale_values, lengths)):
      variable_arrays.replace(variable, value)

  def num_free_pages(self) -> int:
    return int(np.sum(self._host("page_owner") == -1))

  def pages_of(self, slot: int) -> list[int]:
    """Page ids owned by `slot`, in logical order (entry j of the slot is in pages_of[j // tpp])."""
    slots = self._host_slots(slot, "slot", "pages_of")
    if slots.shape != (1,):
      raise ValueError(f"PagedKVCache.pages_of: slot must be one slot id, got {slots.tolist()}")
    (slot,) = slots
    row = self._host("page_table")[slot]
    return [int(p) for p in row if p >= 0]

  # ---- slot management (KVCache interface) -------------------------------------

  def reset(self, slot) -> None:
    """Forget the sequence in `slot`: same as `free` (pages back to the pool)."""
    self._free(self._host_slots(slot, "slot", "reset"))

  def insert(self, slot, source, source_slot=0) -> None:
    """Copy the sequence in `source_slot` of `source` (KVCache or PagedKVCache) into `slot`.

    The slot's previous sequence is dropped (its pages are freed and zeroed),
    then pages for the source length are reserved and the entries written by
    position (requantized if needed). Raises, with nothing changed, if the
    source is longer than max_length or the pool lacks the pages.
    """
    slots = self._host_slots(slot, "slot", "insert")  # concrete, or refused naming the argument
    rows, src_rows, src_len = self.check_insert_rows(slot, source, source_slot)  # [b] each
    raise_if(src_len > self.max_length,
             lambda: f"PagedKVCache: inserted sequence longer than max_length={self.max_length}")
    # Free the slots' pages and reserve the source length on host copies first: if the
    # pool is short this raises before anything changes.
    owner, table = self._host("page_owner"), self._host("page_table")
    freed = page_plan.release(owner, table, slots)  # [P]
    self._allocate(owner, table, slots, np.asarray(src_len, np.int64))
    # Read before the slots' pages are freed: the source may be this cache.
    key, value = source.read_block(src_rows, 0, source.capacity, self.dtype)  # [b, Cs, K, H]
    # From the source's basis to this cache's (rotated iff quantized, see kvcache.quant).
    key, value = (to_cache_basis(from_cache_basis(x, source.quant), self.quant) for x in (key, value))
    positions = source.entry_positions(src_len)  # [b, Cs]
    self._store_tables(owner, table)
    self._clear_now(freed, page_plan.released_mask(slots, self.batch_size))
    self.write_in_place(rows, key, value, positions, positions >= 0, src_len)


@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def _cleared(pools, scales, lengths, freed, released):
  """pools (K, V [P, tpp, K, H]) zeroed and scales ([P, tpp, K or 1]) set to 1 on the pages
  in freed [P]; lengths [S] set to 0 on the slots in released [S]."""
  pools = tuple(jnp.where(freed[:, None, None, None], jnp.zeros((), pool.dtype), pool)
                for pool in pools)  # [P, tpp, K, H]
  scales = tuple(jnp.where(freed[:, None, None], jnp.ones((), scale.dtype), scale)
                 for scale in scales)  # [P, tpp, K or 1]
  return pools, scales, jnp.where(released, 0, lengths)  # [S]


def _token_counts(value, name: str, where: str, rows: int) -> np.ndarray:
  """[rows] int64 from an int or `rows` ints, refused naming `name` otherwise (a float was
  truncated, a string or bool read as a count). A count below what a slot holds reserves
  nothing (reserve never shrinks)."""
  counts = np.asarray(value)
  if counts.dtype == bool or not np.issubdtype(counts.dtype, np.integer) or counts.ndim > 1 \
      or counts.size not in (1, rows):
    raise ValueError(f"{where}: {name} must be an integer (or one per slot, {rows}), "
                     f"got {value!r}")
  return np.broadcast_to(counts.astype(np.int64).reshape(-1), (rows,))
