"""Decode attention over a ragged batch: one query token per sequence, Pallas kernels.

In a decode step every sequence b has written its new token into the cache
already, so its single query attends over cache entries [0, lengths[b]).
Lengths differ across the batch by orders of magnitude in serving, and the
cache is sized for the longest, so a kernel that reads the padded capacity
spends its memory bandwidth (the whole cost of decode) on nothing. The
kernels here read only each row's valid blocks: the work of a row is
proportional to its own length.

Math (the order of operations of dot_product.py): logits = (q . k) * scale,
soft cap c*tanh(logits/c), mask (j < length, and length-1-j < window for a
sliding window), float32 softmax over [visible keys..., sink] where the
per-head sink logit takes probability mass and adds no value. A row with
nothing visible gives zeros (never NaN). GQA / MQA never repeat K/V: the G
query heads of one kv head are processed together against that head's keys.

int8 K/V (kvcache.quant layout: scales [B, S, K or 1] per token, or per
token and kv head) are read as they are stored, so the cache is never copied
to full precision. The tiles are never dequantized element-wise: the K
scales multiply the [G, block] logits after the q.k dot and the V scales
multiply the probabilities before p.v (`gpu_tile_update`). On GPU an
integer K tile is cast exactly to the query dtype for q.k (a float32
query then runs float32 IEEE dots, which is slow), and int8 V under a
bfloat16 / float16 query runs p.v on int8 tensor cores (p * v_scale as two
exact int8 terms per row, `decode_int8.py`). The
GPU kernel also reads int4 K/V (the Triton lowering loads a contiguous
int4 row as bytes); the paged and TPU kernels take float or int8; the
reference takes any.

Three implementations of one function:
  ragged_decode_reference       pure JAX, the specification (reads the whole
                                padded cache, then masks);
  ragged_decode_pallas(backend="gpu")
                                Triton-style: grid (batch, kv_heads), each
                                program loops (lax.fori_loop, dynamic trip
                                count) over only the ceil(length/block_kv)
                                blocks of its row (from the first block in the
                                window), with masked loads for the tail block;
                                split-K: grid (batch, kv_heads, splits), each
                                program a fixed-size range of those blocks;
  ragged_decode_pallas(backend="tpu")
                                Mosaic-style: grid (batch, kv blocks) with the
                                lengths scalar-prefetched, so the kv-block
                                index_map clamps to the row's first / last
                                valid block: blocks outside are the same block
                                index again, which the pipeline does not fetch.
Both Pallas variants run on CPU with interpret=True (how the tests check them).

GPU constraints (checked when not interpreting): head_dim and block_kv are
powers of two. The G query heads of a kv head are processed as a [Gp, H]
tile, Gp a power of two >= 16 (Triton tensor shapes, tl.dot's smallest
tile), loaded from the unpadded query with a mask and stored back for the G
real rows only: nothing is padded or copied in JAX, K/V never.

Work balance (split-K / flash-decoding, length-aware): one program per (row,
kv head) leaves SMs idle for a small batch of long rows and makes a long row
one serial program, so by default the grid is (batch, kv_heads, P) and
program s of a row runs its blocks [first + s * bps, first + (s + 1) * bps)
-- a fixed number bps of blocks from the row's first visible block. A long
row gets many programs, a short one few: the programs past a row's last
block load nothing, store nothing and exit at once, and every other program
does at most bps blocks, so the last wave of a ragged batch is short. P
covers the longest possible row (the cache capacity, or the window). Each
non-empty program writes float32 partials (max, sum, acc) for the G real
heads; `combine_splits` merges them in plain JAX (the sink joins there once;
the skipped splits are selected away, the partials are B K P G (H + 2)
floats). bps comes from batch * kv_heads vs the SM count
(`auto_num_splits`), or the num_splits / blocks_per_split arguments; P = 1
runs the unsplit kernel, which writes the normalized output directly.
The TPU variant keeps all kv heads of a row in one program so that each K/V
block [block_kv, K, H] has full trailing dims (Mosaic tiling); it has only
been run in interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from meshattn.kvcache.quant import scales_by_token
from meshattn.layers.kernels.decode.decode_common import (
    TRITON_DECODE_LIMITS, auto_tile_keys, check_kernel_kv, check_tunables, compute_itemsize,
    dequantize_or_cast, gpu_decode_program, gpu_load_tile_update, is_pow2, tile_keys_problem,
    masked_decode_attention, init_tpu_scratch, next_pow2, online_block_update,
    pallas_decode_variants, tpu_decode_call, unpack_gpu_refs)
from meshattn.layers.kernels.decode.decode_splits import (
    call_gpu_decode, split_layout, split_nonempty, QUANTIZED_NUM_STAGES, QUANTIZED_TILE_KEYS)
from meshattn.layers.kernels.api import decode_kernel
from meshattn.layers.kernels.registry import ALL, FLOAT32, decode_variant
from meshattn.layers.kernels.shared.online_softmax import finish


RAGGED_FEATURES = frozenset({"gqa", "causal", "window", "soft_cap", "sinks", "quantized_kv"})
# The registry's rows (the reference below, the Pallas pair at the entry point) also take
# float32 queries.
_REGISTERED = RAGGED_FEATURES | FLOAT32

# ---- the specification -----------------------------------------------------------


def ragged_visible(lengths: jax.Array, capacity: int, window: int | None) -> jax.Array:
  """[B, S]: entry j of row b is visible iff j < lengths[b] and lengths[b]-1-j < window."""
  j = jnp.arange(capacity, dtype=jnp.int32)[None, :]  # [1, S]
  n = lengths.astype(jnp.int32)[:, None]  # [B, 1]
  visible = j < n
  if window is not None:
    visible = visible & (n - 1 - j < window)
  return visible


@decode_variant("ragged", ALL, _REGISTERED, "JAX reference", limits=TRITON_DECODE_LIMITS)
@decode_kernel("contiguous")
def ragged_decode_reference(query, key, value, lengths, *, scale, soft_cap=None, window=None,
                            sinks=None, key_scale=None, value_scale=None):
  """Decode attention of query [B, N, H] over key/value [B, S, K, H] for rows of `lengths` [B].

  The specification the Pallas kernels are tested against: plain JAX over
  the whole padded cache, masked to each row's valid entries (and window).
  key_scale / value_scale [B, K or 1, S] (head-major, as the contiguous
  cache stores them) dequantize int8/int4 K/V. Returns [B, N, H] in
  query.dtype; a row of length 0 gives zeros.
  """
  visible = ragged_visible(lengths, key.shape[1], window)  # [B, S]
  token_major = [None if s is None else scales_by_token(s) for s in (key_scale, value_scale)]
  k = dequantize_or_cast(key, token_major[0], jnp.float32)  # [B, S, K, H]
  v = dequantize_or_cast(value, token_major[1], jnp.float32)  # [B, S, K, H]
  return masked_decode_attention(query, k, v, visible, scale=scale, soft_cap=soft_cap, sinks=sinks)


# ---- GPU (Triton) kernel -------------------------------------------------------------


def ragged_row_blocks(length, block_kv: int, window: int | None):
  """(lo, first, last): row entries from lo are visible; blocks [first, last) hold them.

  Scalars in the kernel, [B] arrays for the merge (which splits were written).
  """
  lo = jnp.zeros_like(length) if window is None else jnp.maximum(length - window, 0)
  return lo, lo // block_kv, pl.cdiv(length, block_kv)


def ragged_max_blocks(kv_len: int, block_kv: int, window: int | None) -> int:
  """Most blocks [first, last) can hold for any length <= kv_len (the split grid's extent)."""
  blocks = pl.cdiv(kv_len, block_kv)
  if window is not None:
    # window consecutive entries touch at most (window - 1) // block_kv + 2 blocks.
    blocks = min(blocks, (window - 1) // block_kv + 2)
  return blocks


def _gpu_block(i, carry, q, refs, *, length, lo, block_kv, scale, soft_cap):
  """Online-softmax update of carry with kv block i of one row (masked loads past its length)."""
  k_ref, v_ref, ks_ref, vs_ref = refs  # [S, H], [S, H], [S] or None, [S] or None
  start = i * block_kv
  idx = start + lax.broadcasted_iota(jnp.int32, (block_kv,), 0)  # [bk]
  idx_row = start + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)  # [1, bk]
  valid = (idx < length) & (idx >= lo)  # [bk]
  valid_row = (idx_row < length) & (idx_row >= lo)  # [1, bk]
  rows = pl.ds(start, block_kv)
  # The tail of the last block (and the entries before a window) are masked loads.
  return gpu_load_tile_update(carry, q, k_ref, v_ref, ks_ref, vs_ref, (rows, slice(None)), rows,
                              valid, valid_row, scale=scale, soft_cap=soft_cap)


def _gpu_kernel(*refs, block_kv, blocks_per_split, kv_len, group, scale, soft_cap, window,
                has_sinks, quantized):
  """Program (b, k[, s]): the query heads of kv head k of row b over that row's valid blocks only.

  Unsplit (blocks_per_split None): all the row's blocks, normalized output.
  Split: blocks [first + s * bps, first + (s + 1) * bps) of the row,
  float32 partials (no sink: it joins once, in the merge).
  """
  (length_ref, q_ref), k_ref, v_ref, ks_ref, vs_ref, sink_ref, out_refs = unpack_gpu_refs(
      refs, quantized=quantized, has_sinks=has_sinks, num_prefix=2)
  # [1], [G, H]; K/V [S, H]; scales [S]; sink [G, 1]; out [G, H] or m, l [G, 1], acc [G, H]
  length = jnp.minimum(length_ref[0], kv_len)  # entries past the cache do not exist
  lo, first, last = ragged_row_blocks(length, block_kv, window)  # dynamic trip count
  body = functools.partial(_gpu_block, refs=(k_ref, v_ref, ks_ref, vs_ref), length=length, lo=lo,
                           block_kv=block_kv, scale=scale, soft_cap=soft_cap)
  gpu_decode_program(body, q_ref=q_ref, sink_ref=sink_ref, out_refs=out_refs, first=first,
                     last=last, group=group, blocks_per_split=blocks_per_split)


def _ragged_gpu(query, key, value, lengths, *, scale, soft_cap, window, sinks, key_scale,
                value_scale, block_kv, interpret, num_splits=None, blocks_per_split=None,
                num_warps=None, num_stages=None):
  batch, num_heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  group = num_heads // kv_heads
  quantized = key_scale is not None
  if quantized:
    # Measured best for int8 K/V on the H100 (scripts/tune_decode.py, docs/benchmarks.md).
    block_kv = QUANTIZED_TILE_KEYS if block_kv is None else block_kv
    num_stages = QUANTIZED_NUM_STAGES if num_stages is None else num_stages
  if block_kv is None:
    block_kv = auto_tile_keys(head_dim, compute_itemsize(query.dtype, key.dtype))
  block_kv = min(block_kv, max(16, next_pow2(kv_len)))
  if not interpret and not (is_pow2(block_kv) and is_pow2(head_dim)):
    raise ValueError(f"GPU decode kernel: block_kv={block_kv} and head_dim={head_dim} must be "
                     "powers of two (Triton tensor shapes)")
  problem = None if interpret else tile_keys_problem(block_kv, query.dtype, key.dtype)
  if problem:
    raise ValueError(f"GPU decode kernel: block_kv={block_kv}: {problem}")
  bps, splits = split_layout(ragged_max_blocks(kv_len, block_kv, window),
                             programs=batch * kv_heads, num_splits=num_splits,
                             blocks_per_split=blocks_per_split, interpret=interpret)
  lengths = lengths.astype(jnp.int32)
  q = query.reshape(batch, kv_heads, group, head_dim)  # [B, K, G, H] (free: no padding copy)
  # Index maps take (b, k) or (b, k, split): *_ swallows the split index.
  operands = [lengths, q, key, value]
  in_specs = [
      pl.BlockSpec((1,), lambda b, k, *_: (b,)),
      pl.BlockSpec((None, None, group, head_dim), lambda b, k, *_: (b, k, 0, 0)),
      pl.BlockSpec((None, kv_len, None, head_dim), lambda b, k, *_: (b, 0, k, 0)),
      pl.BlockSpec((None, kv_len, None, head_dim), lambda b, k, *_: (b, 0, k, 0)),
  ]
  if quantized:
    for s in (key_scale, value_scale):  # [B, K or 1, S]: a row of one head is contiguous
      head = (lambda k: k) if s.shape[1] != 1 else (lambda k: 0)
      operands.append(s.astype(jnp.float32))  # a no-op for the cache's float32
      in_specs.append(pl.BlockSpec((None, None, kv_len),
                                   lambda b, k, *_, head=head: (b, head(k), 0)))
  kernel = functools.partial(
      _gpu_kernel, block_kv=block_kv, blocks_per_split=None if splits == 1 else bps,
      kv_len=kv_len, group=group, scale=float(scale),
      soft_cap=float(soft_cap) if soft_cap else None, window=window,
      has_sinks=splits == 1 and sinks is not None, quantized=quantized)
  nonempty = None
  if splits > 1:
    _, first, last = ragged_row_blocks(jnp.minimum(lengths, kv_len), block_kv, window)
    nonempty = split_nonempty(first, last, splits, bps)  # [B, P]
  out = call_gpu_decode(kernel, operands, in_specs, sinks, batch=batch, kv_heads=kv_heads,
                        group=group, head_dim=head_dim, num_splits=splits, nonempty=nonempty,
                        dtype=query.dtype, interpret=interpret, num_warps=num_warps,
                        num_stages=num_stages, name="ragged_decode_gpu")  # [B, K, G, H]
  return out.reshape(batch, num_heads, head_dim)


# ---- TPU (Mosaic) kernel --------------------------------------------------------------


def ragged_block_range(length, block_kv: int, window: int | None):
  """(first, last) kv-block index holding visible entries of a row (last >= first, both valid)."""
  last = jnp.maximum(pl.cdiv(length, block_kv) - 1, 0)
  lo = 0 if window is None else jnp.maximum(length - window, 0)
  first = jnp.minimum(lo // block_kv, last)
  return first, last


def _tpu_kernel(lengths_ref, *refs, block_kv, kv_heads, scale, soft_cap, window, has_sinks,
                quantized):
  """Program (b, i): block i of row b for all kv heads; m / l / acc live in scratch across i."""
  refs = list(refs)
  q_ref, k_ref, v_ref = refs[:3]  # [K, G, H], [bk, K, H], [bk, K, H]
  rest = refs[3:]
  ks_ref = vs_ref = sink_ref = None
  if quantized:
    ks_ref, vs_ref, *rest = rest  # [K or 1, bk]
  if has_sinks:
    sink_ref, *rest = rest  # [K, G, 1]
  o_ref, m_ref, l_ref, acc_ref = rest  # [K, G, H], [K, G, 1], [K, G, 1], [K, G, H]
  b, i = pl.program_id(0), pl.program_id(1)
  length = lengths_ref[b]
  group, head_dim = q_ref.shape[1], q_ref.shape[2]

  pl.when(i == 0)(lambda: init_tpu_scratch(m_ref, l_ref, acc_ref, sink_ref, kv_heads=kv_heads,
                                           group=group, head_dim=head_dim))

  first, last = ragged_block_range(length, block_kv, window)
  lo = 0 if window is None else jnp.maximum(length - window, 0)

  @pl.when((i >= first) & (i <= last) & (length > 0))
  def _update():
    start = i * block_kv
    idx_row = start + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)  # [1, bk]
    idx_col = start + lax.broadcasted_iota(jnp.int32, (block_kv, 1), 0)  # [bk, 1]
    valid_row = (idx_row < length) & (idx_row >= lo)
    valid_col = (idx_col < length) & (idx_col >= lo)
    for kv in range(kv_heads):
      k_scale = v_scale = None
      if quantized:
        sk = kv if ks_ref.shape[0] != 1 else 0
        k_scale = ks_ref[sk:sk + 1, :]  # [1, bk]: scales the logits' columns, no transpose
        v_scale = vs_ref[sk:sk + 1, :]  # [1, bk]
      carry = (m_ref[kv], l_ref[kv], acc_ref[kv])
      tile = (k_ref[:, kv, :], v_ref[:, kv, :], valid_row, valid_col, k_scale, v_scale)
      m, l, acc = online_block_update(carry, q_ref[kv], [tile], scale=scale, soft_cap=soft_cap)
      m_ref[kv], l_ref[kv], acc_ref[kv] = m, l, acc

  @pl.when(i == pl.num_programs(1) - 1)
  def _finish():
    for kv in range(kv_heads):
      o_ref[kv] = finish(l_ref[kv], acc_ref[kv]).astype(o_ref.dtype)


def _ragged_tpu(query, key, value, lengths, *, scale, soft_cap, window, sinks, key_scale,
                value_scale, block_kv, interpret):
  batch, num_heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  group = num_heads // kv_heads
  block_kv = min(block_kv, kv_len)  # a block larger than the cache is the whole cache
  num_blocks = pl.cdiv(kv_len, block_kv)
  quantized = key_scale is not None
  if quantized and not interpret and block_kv % 128 and block_kv != kv_len:
    # The head-major scales' block [K or 1, block_kv] has the keys in lanes.
    raise ValueError(f"block_kv={block_kv}: with quantized K/V the TPU kernel needs a multiple "
                     "of 128 (the scales' lane dimension) or the whole cache")

  def kv_block(b, i, lengths_ref):
    # Outside [first, last] the index repeats the nearest valid block, so the
    # pipeline issues no new DMA there: only the row's visible blocks are read.
    first, last = ragged_block_range(lengths_ref[b], block_kv, window)
    return jnp.clip(i, first, last)

  q = query.reshape(batch, kv_heads, group, head_dim)  # [B, K, G, H]
  operands = [q, key, value]
  in_specs = [
      pl.BlockSpec((None, kv_heads, group, head_dim), lambda b, i, L: (b, 0, 0, 0)),
      pl.BlockSpec((None, block_kv, kv_heads, head_dim), lambda b, i, L: (b, kv_block(b, i, L), 0, 0)),
      pl.BlockSpec((None, block_kv, kv_heads, head_dim), lambda b, i, L: (b, kv_block(b, i, L), 0, 0)),
  ]
  if quantized:
    for s in (key_scale, value_scale):  # [B, K or 1, S]
      operands.append(s.astype(jnp.float32))
      in_specs.append(pl.BlockSpec((None, s.shape[1], block_kv),
                                   lambda b, i, L: (b, 0, kv_block(b, i, L))))
  if sinks is not None:
    operands.append(sinks.astype(jnp.float32).reshape(kv_heads, group, 1))
    in_specs.append(pl.BlockSpec((kv_heads, group, 1), lambda b, i, L: (0, 0, 0)))
  kernel = functools.partial(_tpu_kernel, block_kv=block_kv, kv_heads=kv_heads, scale=float(scale),
                             soft_cap=float(soft_cap) if soft_cap else None, window=window,
                             has_sinks=sinks is not None, quantized=quantized)
  return tpu_decode_call(kernel, [lengths.astype(jnp.int32)], operands, in_specs,
                         grid=(batch, num_blocks), batch=batch, kv_heads=kv_heads, group=group,
                         head_dim=head_dim, dtype=query.dtype, interpret=interpret,
                         name="ragged_decode_tpu")  # [B, N, H]


# ---- public entry point -------------------------------------------------------------


@pallas_decode_variants("ragged", _REGISTERED, TRITON_DECODE_LIMITS)
@decode_kernel("contiguous")
def ragged_decode_pallas(query, key, value, lengths, *, scale, soft_cap=None, window=None,
                         sinks=None, key_scale=None, value_scale=None,
                         block_kv: int | None = None, interpret=False, backend: str = "gpu",
                         num_splits: int | None = None, blocks_per_split: int | None = None,
                         num_warps: int | None = None, num_stages: int | None = None):
  """Pallas decode attention; same arguments and result as `ragged_decode_reference`.

  backend "gpu" (Triton lowering) or "tpu" (Mosaic lowering). interpret=True
  runs either on CPU (tests); for "tpu" a `pltpu.InterpretParams()` is also
  accepted. block_kv: keys per block; None: GPU `auto_tile_keys` for float
  K/V (128 keys at head_dim 128 for bfloat16) and QUANTIZED_TILE_KEYS (64)
  for quantized K/V, TPU 128. GPU: rounded to a power of two no larger than
  needed; TPU: at most the cache length.

  GPU only (tuning knobs; the TPU kernel ignores them):
    num_splits / blocks_per_split: split-K (flash-decoding). Program (b, k, s)
      reads blocks [first + s * bps, first + (s + 1) * bps) of row b (first:
      the row's first visible block) and writes float32 partials merged
      afterwards, so long rows get more programs and short rows' extra
      programs exit at once. blocks_per_split gives bps; num_splits the
      splits of a longest row (bps = ceil(max_blocks / num_splits)); neither:
      `auto_num_splits` from batch * kv_heads vs the SM count (1, the unsplit
      kernel, when interpreting). At most one of the two.
    num_warps, num_stages: Triton launch parameters (None: 4 and 2).
  """
  # int4 on GPU: the Triton lowering loads a contiguous int4 row as bytes and
  # splits the nibbles; the paged kernel's gathered rows have no such path.
  check_kernel_kv(key, value, allow_int4=backend == "gpu")
  check_tunables(num_warps, num_stages)
  args = dict(scale=scale, soft_cap=soft_cap, window=window, sinks=sinks, key_scale=key_scale,
              value_scale=value_scale, interpret=interpret)
  if backend == "gpu":
    return _ragged_gpu(query, key, value, lengths, block_kv=block_kv, num_splits=num_splits,
                       blocks_per_split=blocks_per_split, num_warps=num_warps,
                       num_stages=num_stages, **args)
  if backend == "tpu":
    return _ragged_tpu(query, key, value, lengths, block_kv=128 if block_kv is None else block_kv,
                       **args)
  raise ValueError(f"backend={backend!r}: allowed 'gpu', 'tpu'")
