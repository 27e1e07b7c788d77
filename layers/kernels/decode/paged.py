"""Decode attention over a paged KV cache (kvcache.paged layout), Pallas kernels.

A paged cache keeps K/V in a shared pool key_pages / value_pages
[P, tpp, K, H]; row b's logical entry j lives in page page_table[b, j // tpp]
at offset j % tpp, and table entries past the row's pages are -1. As in
ragged.py, the new token is already in the cache, so row b's single query
attends over entries [0, lengths[b]); the order of operations (scale, soft
cap, mask, float32 softmax with a sink that takes mass and adds no value) and
the int8 scales (on the logits and probabilities, never on the tiles) are
the same, and a row with nothing visible gives zeros.

Why kernels and not a gather: gathering every row's pages into a contiguous
[B, maxp * tpp, K, H] copy reads and writes the padded maximum for every
row. The kernels instead walk each row's own table and touch only its
ceil(length / tpp) pages, `pages_per_block` pages per step (more pages per
step = fewer running-max rescales and more loads in flight):
  backend "gpu"  program (b, k) loads the step's page ids with one vector
                 load (each id repeated for its tpp tokens) and then the
                 step's pages_per_block * tpp K/V rows as one [tokens, H]
                 tile through them (masked past the row's length), so a step
                 is one dot and one rescale however small the pages; the
                 loop's trip count is the row's own number of steps, and the
                 length-aware split-K of ragged.py cuts it into fixed-size
                 ranges of steps;
  backend "tpu"  the page table (flattened) and lengths are scalar-prefetched
                 and the page BlockSpecs' index_maps look the page ids up, one
                 input per page slot of a block (the same pool passed
                 `pages_per_block` times), clamped to the row's last page, so
                 steps past the row's pages repeat a block index and fetch
                 nothing new.
Page ownership: a row reads only pages its slot owns, whatever the page
table says (a corrupt table, or a bug upstream, must not expose another
sequence's K/V). Every entry point takes the pool's `page_owner` [P] (the
slot owning each page, -1 = free; kvcache.paged keeps it) and `slots` [B]
(the cache slot of each row) and first replaces every table entry that its
row does not own -- a page of another slot, a free page, an id outside
[0, P) -- by -1 (`owned_page_table`: one owner lookup per table entry, a
[B, maxp] int32 op ahead of the kernels, so their loops gain no dependent
load). The rule is written once, here; every path (reference, GPU, TPU,
float and int8) then reads that table, where a -1 entry inside a row's
length is a missing page: its entries are invisible, as in the reference
and in kvcache.paged's `read_block`.
A row never reads a page outside its owned table (GPU: masked loads; TPU:
ids come from it) -- with one exception on TPU: a row of length 0 whose
table is empty still has its grid steps, and a -1 slot inside a row's
length has its block, and the pipeline fetches page 0 for them (selected
away, never computed on: whatever page 0 holds, NaN included, cannot reach
the output).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from meshattn.layers.kernels.decode.decode_common import (
    MIN_16BIT_TILE_KEYS, TRITON_DECODE_LIMITS, auto_tile_keys, check_kernel_kv, check_tunables,
    compute_itemsize, dequantize_or_cast, gpu_decode_program, gpu_load_tile_update, is_pow2,
    masked_decode_attention, init_tpu_scratch, next_pow2, no_int4_load, online_block_update,
    pallas_decode_variants, tile_keys_problem, tpu_decode_call, unpack_gpu_refs)
from meshattn.layers.kernels.decode.decode_splits import call_gpu_decode, split_layout, split_nonempty
from meshattn.layers.kernels.api import decode_kernel
from meshattn.layers.kernels.registry import ALL, FLOAT32, decode_variant
from meshattn.layers.kernels.shared.online_softmax import finish

PAGED_FEATURES = frozenset({"gqa", "causal", "soft_cap", "sinks", "quantized_kv", "paged_kv"})
# The registry's rows (the reference below, the Pallas pair at the entry point) also take
# float32 queries, and serve only a paged cache.
_REGISTERED, _PAGED = PAGED_FEATURES | FLOAT32, frozenset({"paged_kv"})
# Neither Pallas kernel reads int4 pages.
_TRITON_LIMITS = dataclasses.replace(TRITON_DECODE_LIMITS, fits=no_int4_load,
                                     why=TRITON_DECODE_LIMITS.why + "; no int4 load")


def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
  """pages [P, tpp, ...] -> each row's logical entries [B, maxp * tpp, ...].

  Unallocated table entries (-1) read as zeros without touching any page
  (an out-of-range index with mode="fill"), not as page P-1 or page 0.
  """
  num_pages, tpp = pages.shape[:2]
  ids = jnp.where(page_table >= 0, page_table, num_pages)  # [B, maxp]; P = no page
  rows = pages.at[ids].get(mode="fill", fill_value=0)  # [B, maxp, tpp, ...]
  return rows.reshape((ids.shape[0], ids.shape[1] * tpp) + pages.shape[2:])


def owned_pages(page_table: jax.Array, page_owner: jax.Array, slots: jax.Array) -> jax.Array:
  """[B, maxp] bool: table entry (b, i) names a page of the pool that slot slots[b] owns.

  page_table [B, maxp], page_owner [P] (-1 = free), slots [B]. An id outside
  [0, P) owns nothing (it is never used as an index), and a free page
  belongs to no slot, not even to a row whose slot is -1.
  """
  page_table, page_owner = jnp.asarray(page_table), jnp.asarray(page_owner)
  slots = jnp.asarray(slots).astype(page_owner.dtype)
  num_pages = page_owner.shape[0]
  in_pool = (page_table >= 0) & (page_table < num_pages)  # [B, maxp]
  owner = page_owner[jnp.where(in_pool, page_table, 0)]  # [B, maxp]: one lookup per page
  return in_pool & (owner >= 0) & (owner == slots[:, None])


def owned_page_table(page_table, page_owner, slots) -> jax.Array:
  """page_table [B, maxp] int32 with -1 (a missing page) for every entry its row does not own."""
  return jnp.where(owned_pages(page_table, page_owner, slots), page_table, -1).astype(jnp.int32)


@decode_variant("paged", ALL, _REGISTERED, "JAX reference", requires=_PAGED,
                limits=TRITON_DECODE_LIMITS)
@decode_kernel("paged")
def paged_decode_reference(query, key_pages, value_pages, page_table, lengths, *, page_owner,
                           slots, scale, soft_cap=None, sinks=None, key_scale=None,
                           value_scale=None):
  """Decode attention of query [B, N, H] over paged K/V; returns [B, N, H] in query.dtype.

  key_pages / value_pages [P, tpp, K, H] (float, int8 or int4 with
  key_scale / value_scale [P, tpp, K or 1]), page_table [B, maxp] (-1 = no
  page), lengths [B], page_owner [P] (slot owning each page, -1 = free),
  slots [B] (row b's cache slot). The specification: gathers every row's
  owned pages (padded to maxp; pages it does not own read as zeros, never
  touched), then masks entries j >= lengths[b] and entries of pages the row
  does not own or that are missing.
  """
  page_table = owned_page_table(page_table, page_owner, slots)  # [B, maxp]
  tpp = key_pages.shape[1]
  k = gather_pages(key_pages, page_table)  # [B, C, K, H]
  v = gather_pages(value_pages, page_table)  # [B, C, K, H]
  ks = None if key_scale is None else gather_pages(key_scale, page_table)  # [B, C, K or 1]
  vs = None if value_scale is None else gather_pages(value_scale, page_table)
  k = dequantize_or_cast(k, ks, jnp.float32)
  v = dequantize_or_cast(v, vs, jnp.float32)
  capacity = k.shape[1]
  j = jnp.arange(capacity, dtype=jnp.int32)[None, :]  # [1, C]
  has_page = jnp.repeat(page_table >= 0, tpp, axis=1)  # [B, C]
  visible = (j < lengths.astype(jnp.int32)[:, None]) & has_page  # [B, C]
  return masked_decode_attention(query, k, v, visible, scale=scale, soft_cap=soft_cap, sinks=sinks)


# ---- GPU (Triton) kernel -------------------------------------------------------------


def _gpu_block(i, carry, q, refs, *, length, table_ref, tpp, block_kv, scale, soft_cap):
  """Online-softmax update of carry with step i: tokens [i * bk, (i + 1) * bk) of the row.

  The step's pages_per_block = bk / tpp pages make one [bk, H] tile (one
  dot, one rescale) instead of one small tile per page.
  """
  from jax.experimental.pallas import triton as plgpu

  k_ref, v_ref, ks_ref, vs_ref = refs  # [P * tpp, H] x2, [P * tpp] x2 or None
  head_dim = k_ref.shape[-1]
  start = i * block_kv
  tok = start + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)  # [bk] logical entries
  tok_row = start + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)  # [1, bk]
  # One vector load of the step's page ids (each repeated for its tpp
  # tokens: the same address within a warp is one transaction), then every
  # K/V row of the tile is addressed through it. Slots past the row's length
  # are not looked up; a -1 slot inside it (a missing page, or one the row's
  # slot does not own: `owned_page_table`) is masked like them, as in the
  # reference, and never dereferenced. The ids are loaded
  # twice, laid out for the rows and for the logits' columns, so no 1-D
  # transpose is needed.
  page = plgpu.load(table_ref.at[lax.div(tok, tpp)], mask=tok < length, other=-1)  # [bk]
  page_row = plgpu.load(table_ref.at[lax.div(tok_row, tpp)], mask=tok_row < length,
                        other=-1)  # [1, bk]
  valid = page >= 0  # [bk]
  valid_row = page_row >= 0  # [1, bk]
  row = jnp.maximum(page, 0) * tpp + lax.rem(tok, tpp)  # [bk] row of the flattened pool
  cols = lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)  # [1, H]
  return gpu_load_tile_update(carry, q, k_ref, v_ref, ks_ref, vs_ref, (row[:, None], cols), row,
                              valid, valid_row, scale=scale, soft_cap=soft_cap)


def _gpu_kernel(*refs, tpp, block_kv, blocks_per_split, capacity, group, scale, soft_cap,
                has_sinks, quantized):
  """Program (b, k[, s]): the query heads of kv head k of row b over that row's own pages.

  Unsplit (blocks_per_split None): all the row's steps, normalized output.
  Split: steps [s * bps, (s + 1) * bps), float32 partials (no sink).
  """
  (length_ref, table_ref, q_ref), k_ref, v_ref, ks_ref, vs_ref, sink_ref, out_refs = (
      unpack_gpu_refs(refs, quantized=quantized, has_sinks=has_sinks, num_prefix=3))
  # [1], [maxp], [G, H]; pools [P * tpp, H]; scales [P * tpp]; sink [G, 1]; outputs
  length = jnp.minimum(length_ref[0], capacity)  # entries past the table do not exist
  body = functools.partial(_gpu_block, refs=(k_ref, v_ref, ks_ref, vs_ref), length=length,
                           table_ref=table_ref, tpp=tpp, block_kv=block_kv, scale=scale,
                           soft_cap=soft_cap)
  gpu_decode_program(body, q_ref=q_ref, sink_ref=sink_ref, out_refs=out_refs, first=0,
                     last=pl.cdiv(length, block_kv), group=group,
                     blocks_per_split=blocks_per_split)


def auto_pages_per_block(head_dim: int, tpp: int, max_pages: int, query_dtype, kv_dtype) -> int:
  """Pages per GPU loop step: `auto_tile_keys` tokens, at most the table's width rounded up to
  a power of two, and at least MIN_16BIT_TILE_KEYS tokens even where the table is narrower
  (a step's tokens past a row's length are never looked up)."""
  keys = auto_tile_keys(head_dim, compute_itemsize(query_dtype, kv_dtype))
  return max(min(max(1, keys // tpp), next_pow2(max_pages)), -(-MIN_16BIT_TILE_KEYS // tpp))


def _paged_gpu(query, key_pages, value_pages, page_table, lengths, *, scale, soft_cap, sinks,
               key_scale, value_scale, pages_per_block, interpret, num_splits=None,
               blocks_per_split=None, num_warps=None, num_stages=None):
  """The GPU kernel over page_table [B, maxp] as `owned_page_table` left it (-1: not readable)."""
  batch, num_heads, head_dim = query.shape
  total_pages, tpp, kv_heads = key_pages.shape[:3]
  max_pages = page_table.shape[1]
  group = num_heads // kv_heads
  if pages_per_block is None:
    pages_per_block = auto_pages_per_block(head_dim, tpp, max_pages, query.dtype, key_pages.dtype)
  block_kv = pages_per_block * tpp  # tokens per loop step
  if not interpret and not (is_pow2(block_kv) and is_pow2(head_dim)):
    raise ValueError(f"GPU paged decode kernel: pages_per_block * tokens_per_page = "
                     f"{pages_per_block} * {tpp} and head_dim={head_dim} must be powers of two "
                     "(Triton tensor shapes)")
  problem = None if interpret else tile_keys_problem(block_kv, query.dtype, key_pages.dtype)
  if problem:
    raise ValueError(f"GPU paged decode kernel: pages_per_block * tokens_per_page = "
                     f"{pages_per_block} * {tpp}: {problem}")
  capacity = max_pages * tpp
  bps, splits = split_layout(pl.cdiv(capacity, block_kv), programs=batch * kv_heads,
                             num_splits=num_splits, blocks_per_split=blocks_per_split,
                             interpret=interpret)
  lengths = lengths.astype(jnp.int32)
  q = query.reshape(batch, kv_heads, group, head_dim)  # [B, K, G, H] (free: no padding copy)
  quantized = key_scale is not None
  # The pools flattened to rows [P * tpp, K, H] (a free reshape): a token is
  # one row index, page * tpp + offset.
  flat = (total_pages * tpp, None, head_dim)
  # Index maps take (b, k) or (b, k, split): *_ swallows the split index.
  operands = [lengths, page_table.astype(jnp.int32), q,
              key_pages.reshape(total_pages * tpp, kv_heads, head_dim),
              value_pages.reshape(total_pages * tpp, kv_heads, head_dim)]
  in_specs = [
      pl.BlockSpec((1,), lambda b, k, *_: (b,)),
      pl.BlockSpec((None, max_pages), lambda b, k, *_: (b, 0)),
      pl.BlockSpec((None, None, group, head_dim), lambda b, k, *_: (b, k, 0, 0)),
      pl.BlockSpec(flat, lambda b, k, *_: (0, k, 0)),
      pl.BlockSpec(flat, lambda b, k, *_: (0, k, 0)),
  ]
  if quantized:
    for s in (key_scale, value_scale):
      head = (lambda k: k) if s.shape[-1] != 1 else (lambda k: 0)
      s = s.reshape(total_pages * tpp, s.shape[-1])  # [P * tpp, K or 1]
      operands.append(s.astype(jnp.float32))  # a no-op for the cache's float32
      in_specs.append(pl.BlockSpec((total_pages * tpp, None),
                                   lambda b, k, *_, head=head: (0, head(k))))
  kernel = functools.partial(
      _gpu_kernel, tpp=tpp, block_kv=block_kv, blocks_per_split=None if splits == 1 else bps,
      capacity=capacity, group=group, scale=float(scale),
      soft_cap=float(soft_cap) if soft_cap else None,
      has_sinks=splits == 1 and sinks is not None, quantized=quantized)
  nonempty = None
  if splits > 1:
    steps = pl.cdiv(jnp.minimum(lengths, capacity), block_kv)  # [B]
    nonempty = split_nonempty(jnp.zeros_like(steps), steps, splits, bps)  # [B, P]
  out = call_gpu_decode(kernel, operands, in_specs, sinks, batch=batch, kv_heads=kv_heads,
                        group=group, head_dim=head_dim, num_splits=splits, nonempty=nonempty,
                        dtype=query.dtype, interpret=interpret, num_warps=num_warps,
                        num_stages=num_stages, name="paged_decode_gpu")  # [B, K, G, H]
  return out.reshape(batch, num_heads, head_dim)


# ---- TPU (Mosaic) kernel --------------------------------------------------------------


def _page_slot(length, i, j, *, tpp: int, pages_per_block: int):
  """Table column that page slot j of block i reads: clamped into the row's own pages."""
  num_pages = pl.cdiv(length, tpp)
  last_block = jnp.maximum(pl.cdiv(num_pages, pages_per_block) - 1, 0)
  slot = jnp.minimum(i, last_block) * pages_per_block + j
  return jnp.minimum(slot, jnp.maximum(num_pages - 1, 0))


def _tpu_kernel(lengths_ref, table_ref, *refs, pages_per_block, max_pages, kv_heads, scale,
                soft_cap, has_sinks, quantized):
  """Program (b, i): pages_per_block pages of row b for all kv heads; state in scratch."""
  ppb = pages_per_block
  refs = list(refs)
  q_ref = refs[0]  # [K, G, H]
  k_refs, v_refs = refs[1:1 + ppb], refs[1 + ppb:1 + 2 * ppb]  # [tpp, K, H] each
  rest = refs[1 + 2 * ppb:]
  ks_refs = vs_refs = sink_ref = None
  if quantized:
    ks_refs, vs_refs, rest = rest[:ppb], rest[ppb:2 * ppb], rest[2 * ppb:]  # [tpp, K or 1] each
  if has_sinks:
    sink_ref, *rest = rest  # [K, G, 1]
  o_ref, m_ref, l_ref, acc_ref = rest  # [K, G, H], [K, G, 1], [K, G, 1], [K, G, H]
  b, i = pl.program_id(0), pl.program_id(1)
  tpp = k_refs[0].shape[0]
  length = jnp.minimum(lengths_ref[b], max_pages * tpp)  # entries past the table do not exist
  group, head_dim = q_ref.shape[1], q_ref.shape[2]

  pl.when(i == 0)(lambda: init_tpu_scratch(m_ref, l_ref, acc_ref, sink_ref, kv_heads=kv_heads,
                                           group=group, head_dim=head_dim))

  @pl.when(i * ppb * tpp < length)
  def _update():
    for kv in range(kv_heads):
      tiles = []
      for j in range(ppb):
        slot = i * ppb + j  # logical slot (the page itself may be a clamped repeat)
        start = slot * tpp
        # A -1 slot inside the length is a missing (or not owned) page: the
        # index_map read page 0 for it, which is masked here, as the reference masks it.
        has_page = table_ref[b * max_pages + jnp.minimum(slot, max_pages - 1)] >= 0
        valid_row = (start + lax.broadcasted_iota(jnp.int32, (1, tpp), 1) < length) & has_page
        valid_col = (start + lax.broadcasted_iota(jnp.int32, (tpp, 1), 0) < length) & has_page
        k_scale = v_scale = None
        if quantized:
          sk = kv if ks_refs[j].shape[1] != 1 else 0
          k_scale, v_scale = ks_refs[j][:, sk:sk + 1], vs_refs[j][:, sk:sk + 1]  # [tpp, 1]
        tiles.append((k_refs[j][:, kv, :], v_refs[j][:, kv, :], valid_row, valid_col,
                      k_scale, v_scale))
      carry = (m_ref[kv], l_ref[kv], acc_ref[kv])
      m, l, acc = online_block_update(carry, q_ref[kv], tiles, scale=scale, soft_cap=soft_cap)
      m_ref[kv], l_ref[kv], acc_ref[kv] = m, l, acc

  @pl.when(i == pl.num_programs(1) - 1)
  def _finish():
    for kv in range(kv_heads):
      o_ref[kv] = finish(l_ref[kv], acc_ref[kv]).astype(o_ref.dtype)


def _paged_tpu(query, key_pages, value_pages, page_table, lengths, *, scale, soft_cap, sinks,
               key_scale, value_scale, pages_per_block, interpret):
  """The TPU kernel over page_table [B, maxp] as `owned_page_table` left it (-1: not readable)."""

  batch, num_heads, head_dim = query.shape
  tpp, kv_heads = key_pages.shape[1:3]
  max_pages = page_table.shape[1]
  group = num_heads // kv_heads
  ppb = pages_per_block
  quantized = key_scale is not None

  def page_map(j, trailing: int):
    def index_map(b, i, lengths_ref, table_ref):
      length = jnp.minimum(lengths_ref[b], max_pages * tpp)  # as in the kernel
      slot = _page_slot(length, i, j, tpp=tpp, pages_per_block=ppb)
      page = jnp.maximum(table_ref[b * max_pages + slot], 0)  # -1: masked in the kernel
      return (page, 0) + (0,) * trailing
    return index_map

  q = query.reshape(batch, kv_heads, group, head_dim)  # [B, K, G, H]
  operands = [q]
  in_specs = [pl.BlockSpec((None, kv_heads, group, head_dim), lambda b, i, L, T: (b, 0, 0, 0))]
  for pool in (key_pages, value_pages):
    for j in range(ppb):
      operands.append(pool)
      in_specs.append(pl.BlockSpec((None, tpp, kv_heads, head_dim), page_map(j, 2)))
  if quantized:
    for s in (key_scale, value_scale):
      for j in range(ppb):
        operands.append(s.astype(jnp.float32))
        in_specs.append(pl.BlockSpec((None, tpp, s.shape[-1]), page_map(j, 1)))
  if sinks is not None:
    operands.append(sinks.astype(jnp.float32).reshape(kv_heads, group, 1))
    in_specs.append(pl.BlockSpec((kv_heads, group, 1), lambda b, i, L, T: (0, 0, 0)))
  kernel = functools.partial(_tpu_kernel, pages_per_block=ppb, max_pages=max_pages,
                             kv_heads=kv_heads,
                             scale=float(scale), soft_cap=float(soft_cap) if soft_cap else None,
                             has_sinks=sinks is not None, quantized=quantized)
  prefetch = [lengths.astype(jnp.int32), page_table.astype(jnp.int32).reshape(-1)]
  return tpu_decode_call(kernel, prefetch, operands, in_specs,
                         grid=(batch, pl.cdiv(max_pages, ppb)), batch=batch, kv_heads=kv_heads,
                         group=group, head_dim=head_dim, dtype=query.dtype, interpret=interpret,
                         name="paged_decode_tpu")  # [B, N, H]


# ---- public entry point -------------------------------------------------------------


@pallas_decode_variants("paged", _REGISTERED, _TRITON_LIMITS, requires=_PAGED)
@decode_kernel("paged")
def paged_decode_pallas(query, key_pages, value_pages, page_table, lengths, *, page_owner, slots,
                        scale, soft_cap=None, sinks=None, key_scale=None, value_scale=None,
                        pages_per_block: int | None = None, interpret=False,
                        backend: str = "gpu", num_splits: int | None = None,
                        blocks_per_split: int | None = None, num_warps: int | None = None,
                        num_stages: int | None = None):
  """Pallas paged decode attention; same arguments and result as `paged_decode_reference`
  (page ownership included: the kernels get `owned_page_table`).

  pages_per_block >= 1 pages per loop step / grid step. None: on GPU the
  pages of `auto_tile_keys` tokens (128 tokens at head_dim 128 for a
  bfloat16 query, as ragged.py's block; one 16-token page a step leaves too
  few loads in flight), at most the table's width rounded up to a power of
  two; on TPU 1 (each page slot is one more pipelined input there). On GPU pages_per_block *
  tokens_per_page must be a power of two (one [tokens, H] tile per step).
  backend "gpu" (Triton) or "tpu" (Mosaic); interpret=True runs either on
  CPU. num_splits / blocks_per_split (in loop steps), num_warps, num_stages
  (GPU only): as in `ragged_decode_pallas`, the split-K layout being
  length-aware over each row's steps.
  """
  if pages_per_block is None and backend != "gpu":
    pages_per_block = 1
  if pages_per_block is not None and pages_per_block < 1:
    raise ValueError(f"pages_per_block={pages_per_block}: must be >= 1")
  check_kernel_kv(key_pages, value_pages)
  check_tunables(num_warps, num_stages)
  if backend not in ("gpu", "tpu"):
    raise ValueError(f"backend={backend!r}: allowed 'gpu', 'tpu'")
  table = owned_page_table(page_table, page_owner, slots)  # [B, maxp]
  args = dict(scale=scale, soft_cap=soft_cap, sinks=sinks, key_scale=key_scale,
              value_scale=value_scale, pages_per_block=pages_per_block, interpret=interpret)
  if backend == "gpu":
    return _paged_gpu(query, key_pages, value_pages, table, lengths, num_splits=num_splits,
                      blocks_per_split=blocks_per_split, num_warps=num_warps,
                      num_stages=num_stages, **args)
  return _paged_tpu(query, key_pages, value_pages, table, lengths, **args)
