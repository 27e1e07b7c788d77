"""What the ragged and paged decode kernels share: the reference math, the
online-softmax block updates, argument checks and the GPU in-kernel helpers.
The length-aware split-K (flash-decoding) layout and the Triton call
plumbing are in decode_splits.py. See ragged.py for the design. Also what their
registrations share: the Triton kernels' head_dim limits and the pair of Pallas
variants (GPU, TPU) each of them registers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from meshattn.layers.kernels.decode.decode_int8 import int8_pair_dot, rows_to_int8, uses_int8_pv
from meshattn.layers.kernels.registry import GPU, TPU, Limits, Request, decode_variant
from meshattn.layers.kernels.shared.online_softmax import NEG, finish

# ---- registration -----------------------------------------------------------------

# The Triton decode kernels tile K/V per head_dim to fit shared memory but need power-of-two
# head dims, from 16 (the smallest dot). The references keep these limits on GPU too, as
# `ragged` / `paged` always did.
TRITON_DECODE_LIMITS = Limits(GPU, min_head_dim=16, head_dim_power_of_two=True,
                              why="the Triton decode kernels' block shapes")


def no_int4_load(request: Request) -> str | None:
  """The TPU kernels and the paged GPU kernel have no sub-byte load."""
  return "an int4 cache (no sub-byte load)" if request.kv_dtype == "int4" else None


def pallas_decode_variants(name: str, features: frozenset[str], gpu_limits: Limits, **fields):
  """Registers a Pallas decode function taking `backend` as two variants of `name`: Triton
  on GPU and Mosaic on TPU (interpretable: runs in TPU interpret mode on this host), both
  ranked 1, ahead of the JAX reference (rank 0), which serves what they cannot read."""

  def wrap(fn):
    decode_variant(name, GPU, features, "Triton (GPU)", rank=1, bind=(("backend", "gpu"),),
                   limits=gpu_limits, **fields)(fn)
    return decode_variant(name, TPU, features, "Mosaic TPU", rank=1, bind=(("backend", "tpu"),),
                          interpretable=True, limits=Limits(TPU, fits=no_int4_load), **fields)(fn)

  return wrap




_HIGHEST = lax.Precision.HIGHEST


def dequantize_or_cast(x: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
  """x [..., S, K, H] (int8 or float), scale [..., S, K or 1] or None -> float `dtype`."""
  if scale is None:
    return x.astype(dtype)
  return (x.astype(jnp.float32) * scale[..., None].astype(jnp.float32)).astype(dtype)


def masked_decode_attention(query, key, value, visible, *, scale, soft_cap=None, sinks=None):
  """Softmax attention of query [B, N, H] over key/value [B, S, K, H] (float32) where visible [B, S].

  Shared by the ragged and paged references. Invisible keys / values are
  replaced by zeros before any arithmetic, so whatever they hold (stale data,
  NaN) cannot reach the output.
  """
  batch, num_heads, head_dim = query.shape
  kv_heads = key.shape[2]
  group = num_heads // kv_heads  # a multiple: api.check_decode_operands
  key = jnp.where(visible[:, :, None, None], key, 0.0)  # [B, S, K, H]
  value = jnp.where(visible[:, :, None, None], value, 0.0)  # [B, S, K, H]
  q = query.astype(jnp.float32).reshape(batch, kv_heads, group, head_dim)  # [B, K, G, H]
  logits = jnp.einsum("BKGH,BSKH->BKGS", q, key, precision=_HIGHEST) * scale  # [B, K, G, S]
  if soft_cap:
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  allowed = visible[:, None, None, :]  # [B, 1, 1, S]
  logits = jnp.where(allowed, logits, NEG)
  m = logits.max(-1, keepdims=True)  # [B, K, G, 1]
  if sinks is not None:
    sink = sinks.astype(jnp.float32).reshape(1, kv_heads, group, 1)  # [1, K, G, 1]
    m = jnp.maximum(m, sink)
  p = jnp.where(allowed, jnp.exp(logits - m), 0.0)  # [B, K, G, S]
  denom = p.sum(-1, keepdims=True)  # [B, K, G, 1]
  if sinks is not None:
    denom = denom + jnp.exp(sink - m)  # the sink's mass; it contributes no value
  out = jnp.einsum("BKGS,BSKH->BKGH", p, value, precision=_HIGHEST)  # [B, K, G, H]
  out = finish(denom, out)
  return out.reshape(batch, num_heads, value.shape[-1]).astype(query.dtype)  # [B, N, H]


# ---- online softmax ------------------------------------------------------------------


_QK = (((1,), (1,)), ((), ()))  # [Gp, H] . [bk, H] -> [Gp, bk]
_PV = (((1,), (0,)), ((), ()))  # [Gp, bk] . [bk, H] -> [Gp, H]


def gpu_tile_update(carry, q, k, v, valid_col, valid_row, k_scale, v_scale, *, scale, soft_cap):
  """One online-softmax step of q [Gp, H] over one GPU tile of keys.

  carry = (m [Gp, 1], l [Gp, 1], acc [Gp, H]) in float32. k, v [bk, H] come
  from masked loads, so their invalid rows are already zeros (and NaN or
  stale data there was never read). valid_row [1, bk] masks the logits,
  valid_col [bk, 1] the value rows.

  Quantized tiles come with per-token scales k_scale, v_scale [1, bk]
  (float32, zero where invalid). They are never applied to the tiles:
    q . (s_j k_j) = s_j (q . k_j)    -> the K scales multiply the [Gp, bk] logits,
    sum_j p_j (s_j v_j) = sum_j (p_j s_j) v_j -> the V scales multiply p,
  which is O(Gp * bk) work instead of O(bk * H). l sums the unscaled p.

  q.k: an integer K tile is cast exactly to the query dtype (|x| <= 127 is
  exact in bfloat16), so a bfloat16 query keeps an exact bfloat16
  tensor-core dot.

  p.v: int8 V under a 16-bit query (`uses_int8_pv`: tiles of 32 keys or
  more) runs on int8 tensor cores with the V tile as loaded: p * v_scale is
  split per tile into two int8 terms hi + lo / 254 against a per-row scale (`rows_to_int8`), so
  the dot is two exact int8 x int8 -> int32 dots and p is within 1.6e-5 of
  its row's largest entry -- closer than the bfloat16 path's rounding of p
  (up to 2^-8 of each entry). The value tile is neither converted nor
  re-staged as bfloat16 for it (speed: the same as the bfloat16 path on
  the H100, docs/benchmarks.md).

  int4 tiles arrive here widened to int8 (gpu_load_tile_update), so they take
  these same paths.

  Otherwise a value tile that needs a cast (int8 under a float32 query,
  or bfloat16 under a float32 query) goes through a select on
  valid_col after it (a no-op on values):
  without it Triton folds the cast into the dot operand's layout and reads
  the tile from shared memory one byte per instruction; with it the tile is
  read in 16-byte vectors, cast, and re-staged for ldmatrix.trans. A tile
  already in the dots' dtype goes from the async copy straight to ldmatrix.
  """
  m, l, acc = carry
  if k_scale is not None or q.dtype == k.dtype:
    dtype = q.dtype  # int8 -> q.dtype is exact
  else:
    dtype = jnp.float32  # e.g. a float32 query over a bfloat16 cache
  logits = lax.dot_general(q.astype(dtype), k.astype(dtype), _QK, precision=_HIGHEST,
                           preferred_element_type=jnp.float32)  # [Gp, bk]
  # One [Gp, bk] multiply for both the softmax scale and the K scales.
  logits = logits * (scale if k_scale is None else k_scale * scale)
  if soft_cap:
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  logits = jnp.where(valid_row, logits, NEG)  # [Gp, bk]
  m_new = jnp.maximum(m, logits.max(axis=1, keepdims=True))  # [Gp, 1]
  correction = jnp.exp(m - m_new)  # [Gp, 1]
  # Every tile the GPU loops visit holds a visible key, so m_new is finite
  # after it; the select only guards a caller that breaks that.
  p = jnp.where(valid_row, jnp.exp(logits - m_new), 0.0)  # [Gp, bk]
  l_new = l * correction + p.sum(axis=1, keepdims=True)  # [Gp, 1]
  if v_scale is not None:
    p = p * v_scale  # [Gp, bk] * [1, bk]
  if uses_int8_pv(q.dtype, v.dtype, v.shape[0]):
    p_hi, p_lo, p_scale = rows_to_int8(p)  # [Gp, bk] x2, [Gp, 1]
    pv = int8_pair_dot(p_hi, p_lo, v, _PV) * p_scale  # [Gp, H]
  else:
    if v.dtype != dtype:
      v = jnp.where(valid_col, v.astype(dtype), jnp.zeros((), dtype))  # [bk, H] (see above)
    pv = lax.dot_general(p.astype(dtype), v, _PV, precision=_HIGHEST,
                         preferred_element_type=jnp.float32)  # [Gp, H]
  return m_new, l_new, acc * correction + pv


def gpu_load_tile_update(carry, q, k_ref, v_ref, ks_ref, vs_ref, kv_index, scale_index, valid,
                         valid_row, *, scale, soft_cap):
  """Masked loads of one K/V tile (and its int8 scales) at kv_index / scale_index, then
  gpu_tile_update. valid [bk] keys of the tile; masked entries are never read, so stale
  data or NaN there cannot reach the output."""
  from jax.experimental.pallas import triton as plgpu
  k = plgpu.load(k_ref.at[kv_index], mask=valid[:, None], other=0)  # [bk, H]
  v = plgpu.load(v_ref.at[kv_index], mask=valid[:, None], other=0)  # [bk, H]
  if k.dtype == jnp.int4:
    # Unpacked nibbles widen to int8 (exact), so int4 tiles take the int8 path's verified
    # casts and dots (the Triton module never casts int4 straight to a float).
    k, v = k.astype(jnp.int8), v.astype(jnp.int8)  # [bk, H] x2
  k_scale = v_scale = None
  if ks_ref is not None:
    k_scale = plgpu.load(ks_ref.at[scale_index], mask=valid, other=0.0)[None, :]  # [1, bk]
    v_scale = plgpu.load(vs_ref.at[scale_index], mask=valid, other=0.0)[None, :]  # [1, bk]
  return gpu_tile_update(carry, q, k, v, valid[:, None], valid_row, k_scale, v_scale,
                         scale=scale, soft_cap=soft_cap)


def online_block_update(carry, q, tiles, *, scale, soft_cap):
  """One online-softmax step of q [G, H] over a block made of one or more tiles (TPU kernels).

  carry = (m [G, 1], l [G, 1], acc [G, H]) in float32. Each tile is
  (k [bk, H], v [bk, H], valid_row [1, bk], valid_col [bk, 1], k_scale, v_scale):
  the visibility mask is given twice, laid out for the logits' columns and
  for the value rows, so no kernel needs a 1-D transpose. Several tiles (the
  pages of a paged block) share one running-max rescale. int8 tiles come
  with per-token scales laid out as their cache stores them: [bk, 1] (page
  pools, token-major) dequantize K and V here; [1, bk] (the contiguous
  cache, head-major) scale the logits' columns and the probabilities
  instead, so neither layout needs a lane <-> sublane transpose.
  Invisible value rows and probabilities are zeroed: a TPU block (or the
  padded tail of a partial block, or a clamped page) may hold anything, NaN
  included.
  """
  m, l, acc = carry
  parts = []
  for k, v, valid_row, valid_col, k_scale, v_scale in tiles:
    by_column = k_scale is not None and k_scale.shape[0] == 1 and k.shape[0] > 1  # [1, bk]
    if k_scale is not None and not by_column:
      k = k.astype(jnp.float32) * k_scale  # [bk, H]
      v = v.astype(jnp.float32) * v_scale  # [bk, H]
    dtype = q.dtype if q.dtype == k.dtype else jnp.float32
    v = jnp.where(valid_col, v.astype(dtype), jnp.zeros((), dtype))  # [bk, H]
    logits = lax.dot_general(q.astype(dtype), k.astype(dtype), _QK, precision=_HIGHEST,
                             preferred_element_type=jnp.float32)  # [G, bk]
    logits = logits * (k_scale * scale if by_column else scale)
    if soft_cap:
      logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(valid_row, logits, NEG)  # [G, bk]
    parts.append((logits, v, valid_row, dtype, v_scale if by_column else None))
  m_new = m
  for logits, *_ in parts:
    m_new = jnp.maximum(m_new, logits.max(axis=1, keepdims=True))  # [G, 1]
  correction = jnp.exp(m - m_new)  # [G, 1]
  l_new, acc_new = l * correction, acc * correction  # [G, 1], [G, H]
  for logits, v, valid_row, dtype, v_scale in parts:
    p = jnp.where(valid_row, jnp.exp(logits - m_new), 0.0)  # [G, bk]
    l_new = l_new + p.sum(axis=1, keepdims=True)
    if v_scale is not None:  # selected, not multiplied: scales past the end may be NaN
      p = jnp.where(valid_row, p * v_scale, 0.0)  # [G, bk] * [1, bk]
    acc_new = acc_new + lax.dot_general(p.astype(dtype), v, _PV, precision=_HIGHEST,
                                        preferred_element_type=jnp.float32)  # [G, H]
  return m_new, l_new, acc_new


def initial_carry(sink, group: int, head_dim: int):
  """(m, l, acc) before any key: the sink (if any) is the first 'key', with no value."""
  if sink is None:
    m = jnp.full((group, 1), NEG, jnp.float32)
    l = jnp.zeros((group, 1), jnp.float32)
  else:
    m = sink.astype(jnp.float32)  # [G, 1]
    l = jnp.ones((group, 1), jnp.float32)  # exp(sink - m) = 1
  return m, l, jnp.zeros((group, head_dim), jnp.float32)



# ---- argument checks and shapes -------------------------------------------------------


def check_kernel_kv(key, value, *, allow_int4: bool = False):
  """The Pallas kernels load float or int8 K/V (int4 where allow_int4). The shapes and
  scales every decode kernel needs are checked before (api.decode_kernel)."""
  allowed = (jnp.int8, jnp.int4) if allow_int4 else (jnp.int8,)
  for name, x in (("key", key), ("value", value)):
    if jnp.issubdtype(x.dtype, jnp.integer) and x.dtype not in allowed:
      what = "int8 or int4" if allow_int4 else "int8"
      raise NotImplementedError(f"{name} dtype {x.dtype}: this Pallas decode kernel reads {what} "
                                "or float K/V (use the reference)")


def is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def prev_pow2(n: int) -> int:
  return 1 << (max(n, 1).bit_length() - 1)


def triton_group(group: int) -> int:
  """Query heads per program on GPU: a power of two >= 16 (tl.dot's smallest M tile)."""
  return max(16, next_pow2(group))


# Shared-memory bytes of one K (or V) tile when the tile size is automatic:
# 128 bfloat16 keys of head_dim 128, ~73 KB of shared memory per program at
# 2 stages (three programs per SM; Triton 3.9, sm_90, 4 warps). Counted in
# the dtype the dots run in, not the stored one: a tile that is cast (int4,
# or int8 under a float32 query) is re-staged in shared memory in that dtype
# (see gpu_tile_update). The ragged kernel sizes quantized tiles with
# QUANTIZED_TILE_KEYS instead.
GPU_TILE_BYTES = 128 * 128 * 2


def auto_tile_keys(head_dim: int, itemsize: int) -> int:
  """Keys per GPU loop step for GPU_TILE_BYTES of `itemsize` (compute dtype): a power of two in
  [16, 512]."""
  return int(min(512, max(16, prev_pow2(GPU_TILE_BYTES // max(head_dim * itemsize, 1)))))


# Triton's 16-bit tensor-core dot needs at least 16 keys of contraction: p.v over tiles of
# 8 keys under a bfloat16 / float16 query gave exactly twice the reference on the H200
# (jax 0.11.2, every K/V dtype and cast tried; float32 dots were right; docs/benchmarks.md
# 2026-12-05). `auto_tile_keys` never goes below it; an explicit smaller tile is refused.
MIN_16BIT_TILE_KEYS = 16


def tile_keys_problem(tile_keys: int, query_dtype, kv_dtype) -> str | None:
  """Why a compiled GPU decode tile of `tile_keys` keys cannot run these dtypes, or None."""
  if compute_itemsize(query_dtype, kv_dtype) == 2 and tile_keys < MIN_16BIT_TILE_KEYS:
    return (f"{tile_keys} keys per tile under 16-bit dots (a {jnp.dtype(query_dtype).name} "
            f"query): Triton's 16-bit dot needs >= {MIN_16BIT_TILE_KEYS} (8-key tiles gave "
            "twice the reference on the H200)")
  return None


def compute_itemsize(query_dtype, kv_dtype) -> int:
  """Bytes per element of the dots' inputs, as staged in shared memory: integer K/V count at the
  query's width (the widest they are staged in), float K/V of another width than the query run
  in float32."""
  q, kv = jnp.dtype(query_dtype), jnp.dtype(kv_dtype)
  if jnp.issubdtype(kv, jnp.integer) or q == kv:
    return q.itemsize
  return 4


def check_tunables(num_warps, num_stages):
  for name, value in (("num_warps", num_warps), ("num_stages", num_stages)):
    if value is not None and value < 1:
      raise ValueError(f"{name}={value}: must be >= 1 (or None)")
  if num_warps is not None and not is_pow2(num_warps):
    raise ValueError(f"num_warps={num_warps}: must be a power of two")


# ---- GPU in-kernel helpers ------------------------------------------------------------


def group_index(padded_group: int, width: int):
  """(rows [Gp, 1], cols [1, width]) int32 indices of a [Gp, width] tile of a [G, width] ref."""
  rows = lax.broadcasted_iota(jnp.int32, (padded_group, 1), 0)
  cols = lax.broadcasted_iota(jnp.int32, (1, width), 1)
  return rows, cols


def load_group(ref, group: int, padded_group: int, live=None, other=0):
  """ref [G, D] -> [Gp, D]: the G query heads of a kv head, zero-padded rows past G.

  Loaded with a mask instead of padding the array in JAX, so no copy of the
  query (and no extra kernel launch) precedes the call.
  """
  from jax.experimental.pallas import triton as plgpu
  rows, cols = group_index(padded_group, ref.shape[-1])
  mask = rows < group
  if live is not None:
    mask = mask & live
  return plgpu.load(ref.at[rows, cols], mask=mask, other=other)  # [Gp, D]


def store_group(ref, value, group: int, live=None):
  """value [Gp, D] -> ref [G, D], rows past G (and everything when not `live`) not written."""
  from jax.experimental.pallas import triton as plgpu
  rows, cols = group_index(value.shape[0], value.shape[1])
  mask = rows < group
  if live is not None:
    mask = mask & live
  plgpu.store(ref.at[rows, cols], value.astype(ref.dtype), mask=mask)


def unpack_gpu_refs(refs, *, quantized, has_sinks, num_prefix):
  """(prefix refs, k_ref, v_ref, ks_ref, vs_ref, sink_ref, output refs) of a GPU decode kernel."""
  refs = list(refs)
  prefix, rest = refs[:num_prefix], refs[num_prefix:]
  k_ref, v_ref, *rest = rest
  ks_ref = vs_ref = sink_ref = None
  if quantized:
    ks_ref, vs_ref, *rest = rest
  if has_sinks:
    sink_ref, *rest = rest
  return prefix, k_ref, v_ref, ks_ref, vs_ref, sink_ref, rest


def split_bounds(first, last, split, blocks_per_split: int):
  """Blocks [start, end) of split `split`: a fixed-size range from the row's first block.

  Every split is blocks_per_split long (the last one of a row shorter), so
  the work per program does not depend on the row's length: a long row gets
  more programs, not longer ones, and the splits past a short row's blocks
  are empty (start >= end: the program reads nothing and exits). Works on
  in-kernel scalars and on [B, P] arrays (`split_nonempty`).
  """
  start = first + split * blocks_per_split
  return start, jnp.minimum(start + blocks_per_split, last)


def gpu_decode_program(body, *, q_ref, sink_ref, out_refs, first, last, group: int,
                       blocks_per_split: int | None):
  """The loop of one GPU program over blocks [first, last) of its row, and its stores.

  blocks_per_split None: the unsplit kernel (one program per (row, kv head)),
  out_refs = (o [G, H],), normalized output with the sink. Otherwise program
  (b, k, s) runs blocks split_bounds(first, last, s) and writes float32
  partials out_refs = (m [G, 1], l [G, 1], acc [G, H]); an empty split (past
  its row's blocks) loads and stores nothing, and `combine_splits` skips it.
  """
  padded_group = triton_group(group)
  head_dim = q_ref.shape[-1]
  live = None
  if blocks_per_split is not None:
    first, last = split_bounds(first, last, pl.program_id(2), blocks_per_split)
    live = first < last
  q = load_group(q_ref, group, padded_group, live)  # [Gp, H]
  sink = None
  if sink_ref is not None:
    sink = load_group(sink_ref, group, padded_group)  # [Gp, 1]
  carry = initial_carry(sink, padded_group, head_dim)
  m, l, acc = lax.fori_loop(first, last, lambda i, c: body(i, c, q), carry)
  if blocks_per_split is None:
    (o_ref,) = out_refs
    store_group(o_ref, finish(l, acc), group)
  else:
    m_ref, l_ref, acc_ref = out_refs
    store_group(m_ref, m, group, live)
    store_group(l_ref, l, group, live)
    store_group(acc_ref, acc, group, live)


def init_tpu_scratch(m_ref, l_ref, acc_ref, sink_ref, *, kv_heads: int, group: int,
                     head_dim: int) -> None:
  """A TPU decode program's first step: each kv head's running max / sum / accumulator
  ([K, G, 1], [K, G, 1], [K, G, H] scratch) start from its sink (sink_ref [K, G, 1]) or empty."""
  for kv in range(kv_heads):
    m, l, acc = initial_carry(None if sink_ref is None else sink_ref[kv], group, head_dim)
    m_ref[kv], l_ref[kv], acc_ref[kv] = m, l, acc


def tpu_decode_call(kernel, prefetch, operands, in_specs, *, grid, batch: int, kv_heads: int,
                    group: int, head_dim: int, dtype, interpret, name: str) -> jax.Array:
  """One TPU decode pallas_call (ragged and paged): `prefetch` scalar arrays first (lengths,
  page tables), a [B, K, G, H] output block per row, float32 m / l / acc scratch; programs
  split over rows ("parallel") and walk their key blocks ("arbitrary"). Returns [B, N, H]."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=len(prefetch),
      grid=grid,
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, kv_heads, group, head_dim), lambda b, i, *_: (b, 0, 0, 0)),
      scratch_shapes=[pltpu.VMEM((kv_heads, group, 1), jnp.float32),
                      pltpu.VMEM((kv_heads, group, 1), jnp.float32),
                      pltpu.VMEM((kv_heads, group, head_dim), jnp.float32)])
  out = pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((batch, kv_heads, group, head_dim), dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name=name,
  )(*prefetch, *operands)  # [B, K, G, H]
  return out.reshape(batch, kv_heads * group, head_dim)  # [B, N, H]
