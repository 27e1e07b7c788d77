"""What the ragged and paged decode kernels share: the reference math, the
online-softmax block update, argument checks, the split-K (flash-decoding)
machinery and the Triton call plumbing. See ragged.py for the design."""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# Masked logits: finite, so a row with nothing visible stays NaN-free.
_NEG = -1e30


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
  if num_heads % kv_heads:
    raise ValueError(f"query heads {num_heads} must be a multiple of kv heads {kv_heads}")
  group = num_heads // kv_heads
  key = jnp.where(visible[:, :, None, None], key, 0.0)  # [B, S, K, H]
  value = jnp.where(visible[:, :, None, None], value, 0.0)  # [B, S, K, H]
  q = query.astype(jnp.float32).reshape(batch, kv_heads, group, head_dim)  # [B, K, G, H]
  logits = jnp.einsum("BKGH,BSKH->BKGS", q, key, precision=_HIGHEST) * scale  # [B, K, G, S]
  if soft_cap:
    logits = soft_cap * jnp.tanh(logits / soft_cap)
  allowed = visible[:, None, None, :]  # [B, 1, 1, S]
  logits = jnp.where(allowed, logits, _NEG)
  m = logits.max(-1, keepdims=True)  # [B, K, G, 1]
  if sinks is not None:
    sink = sinks.astype(jnp.float32).reshape(1, kv_heads, group, 1)  # [1, K, G, 1]
    m = jnp.maximum(m, sink)
  p = jnp.where(allowed, jnp.exp(logits - m), 0.0)  # [B, K, G, S]
  denom = p.sum(-1, keepdims=True)  # [B, K, G, 1]
  if sinks is not None:
    denom = denom + jnp.exp(sink - m)  # the sink's mass; it contributes no value
  out = jnp.einsum("BKGS,BSKH->BKGH", p, value, precision=_HIGHEST)  # [B, K, G, H]
  out = jnp.where(denom > 0, out / jnp.maximum(denom, 1e-30), 0.0)
  return out.reshape(batch, num_heads, value.shape[-1]).astype(query.dtype)  # [B, N, H]


def online_block_update(carry, q, tiles, *, scale, soft_cap):
  """One online-softmax step of q [G, H] over a block made of one or more tiles.

  carry = (m [G, 1], l [G, 1], acc [G, H]) in float32. Each tile is
  (k [bk, H], v [bk, H], valid_row [1, bk], valid_col [bk, 1], k_scale, v_scale):
  the visibility mask is given twice, laid out for the logits' columns and
  for the value rows, so no kernel needs a 1-D transpose. Several tiles (the
  pages of a paged block) share one running-max rescale.

  int8 tiles come with per-token scales in one of two layouts:
    [1, bk]  (GPU) the scales multiply the logits' columns and the
             probabilities instead of the tile, and the int8 tile is cast
             exactly to the query dtype, so a bfloat16 query keeps bfloat16
             tensor-core dots (a dequantized tile would need float32 dots);
    [bk, 1]  (TPU) the tile is dequantized to float32 here (no lane <->
             sublane transpose of the scales).
  Invisible value rows and probabilities are zeroed: a tile read without a
  load mask (TPU blocks, the padded tail of a partial block, a clamped page)
  may hold anything, NaN included.
  """
  m, l, acc = carry
  parts = []
  for k, v, valid_row, valid_col, k_scale, v_scale in tiles:
    by_column = k_scale is not None and k_scale.shape[0] == 1
    if k_scale is not None and not by_column:
      k = k.astype(jnp.float32) * k_scale  # [bk, H]
      v = v.astype(jnp.float32) * v_scale  # [bk, H]
    if by_column or q.dtype == k.dtype:
      dtype = q.dtype  # int8 -> q.dtype is exact
    else:
      dtype = jnp.float32
    v = jnp.where(valid_col, v.astype(dtype), jnp.zeros((), dtype))  # [bk, H]
    logits = lax.dot_general(q.astype(dtype), k.astype(dtype), (((1,), (1,)), ((), ())),
                             precision=_HIGHEST, preferred_element_type=jnp.float32)  # [G, bk]
    if by_column:
      logits = logits * k_scale  # [G, bk] * [1, bk]
    logits = logits * scale
    if soft_cap:
      logits = soft_cap * jnp.tanh(logits / soft_cap)
    logits = jnp.where(valid_row, logits, _NEG)  # [G, bk]
    parts.append((logits, v, valid_row, v_scale if by_column else None, dtype))
  m_new = m
  for logits, *_ in parts:
    m_new = jnp.maximum(m_new, logits.max(axis=1, keepdims=True))  # [G, 1]
  correction = jnp.exp(m - m_new)  # [G, 1]
  l_new, acc_new = l * correction, acc * correction  # [G, 1], [G, H]
  for logits, v, valid_row, v_scale, dtype in parts:
    p = jnp.where(valid_row, jnp.exp(logits - m_new), 0.0)  # [G, bk]
    l_new = l_new + p.sum(axis=1, keepdims=True)
    if v_scale is not None:
      p = jnp.where(valid_row, p * v_scale, 0.0)  # [G, bk] * [1, bk]
    acc_new = acc_new + lax.dot_general(p.astype(dtype), v, (((1,), (0,)), ((), ())),
                                        precision=_HIGHEST,
                                        preferred_element_type=jnp.float32)  # [G, H]
  return m_new, l_new, acc_new


def initial_carry(sink, group: int, head_dim: int):
  """(m, l, acc) before any key: the sink (if any) is the first 'key', with no value."""
  if sink is None:
    m = jnp.full((group, 1), _NEG, jnp.float32)
    l = jnp.zeros((group, 1), jnp.float32)
  else:
    m = sink.astype(jnp.float32)  # [G, 1]
    l = jnp.ones((group, 1), jnp.float32)  # exp(sink - m) = 1
  return m, l, jnp.zeros((group, head_dim), jnp.float32)


def finish(l, acc):
  """acc / l, and zeros where nothing (not even a sink) was visible."""
  return jnp.where(l > 0, acc / jnp.maximum(l, 1e-30), 0.0)


def check_kernel_kv(key, value, key_scale, value_scale):
  """The Pallas kernels read float or int8 K/V; quantized K/V need their scales."""
  for name, x, s in (("key", key, key_scale), ("value", value, value_scale)):
    if jnp.issubdtype(x.dtype, jnp.integer):
      if x.dtype != jnp.int8:
        raise NotImplementedError(f"{name} dtype {x.dtype}: the Pallas decode kernels read int8 or "
                                  "float K/V (use the reference for int4)")
      if s is None:
        raise ValueError(f"{name} is {x.dtype} but no {name}_scale was given")
  if (key_scale is None) != (value_scale is None):
    raise ValueError("key_scale and value_scale must be given together")


def is_pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def triton_group(group: int) -> int:
  """Query heads per program on GPU: a power of two >= 16 (tl.dot's smallest M tile)."""
  return max(16, next_pow2(group))


def pad_groups(query, kv_heads: int, sinks, padded_group: int):
  """query [B, N, H] -> [B, K, Gp, H]; sinks [N] -> [K, Gp, 1] (zeros pad; sliced away after)."""
  batch, num_heads, head_dim = query.shape
  group = num_heads // kv_heads
  q = query.reshape(batch, kv_heads, group, head_dim)  # [B, K, G, H]
  q = jnp.pad(q, ((0, 0), (0, 0), (0, padded_group - group), (0, 0)))  # [B, K, Gp, H]
  if sinks is not None:
    sinks = sinks.astype(jnp.float32).reshape(kv_heads, group)  # [K, G]
    sinks = jnp.pad(sinks, ((0, 0), (0, padded_group - group)))[..., None]  # [K, Gp, 1]
  return q, sinks


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


def split_range(first, last, split, num_splits: int):
  """Blocks [start, end) of split `split` when [first, last) is cut into num_splits even ranges.

  Computed from the row's own block range, so a short row gives its later
  splits empty ranges (start >= end: the program reads nothing).
  """
  per_split = pl.cdiv(jnp.maximum(last - first, 0), num_splits)
  start = first + split * per_split
  return start, jnp.minimum(start + per_split, last)


def combine_splits(m, l, acc, sink, dtype):
  """Merge split partials m, l [B, K, P, Gp, 1], acc [B, K, P, Gp, H] -> [B, K, Gp, H] in dtype.

  The flash-decoding reduction: rescale each split to the common max and
  add. The sink [K, Gp, 1] (or None) is one more 'split' with l = 1 and no
  value, so it is counted exactly once. Empty splits (m = -1e30, l = 0,
  acc = 0) get weight exp(-1e30 - max) = 0, or 1 times zeros when the whole
  row is empty, so a row with nothing visible still gives zeros.
  """
  m_all = m.max(axis=2)  # [B, K, Gp, 1]
  if sink is not None:
    m_all = jnp.maximum(m_all, sink[None])
  w = jnp.exp(m - m_all[:, :, None])  # [B, K, P, Gp, 1]
  l_all = (w * l).sum(axis=2)  # [B, K, Gp, 1]
  acc_all = (w * acc).sum(axis=2)  # [B, K, Gp, H]
  if sink is not None:
    l_all = l_all + jnp.exp(sink[None] - m_all)
  return finish(l_all, acc_all).astype(dtype)


# Programs per SM the automatic split count aims for: enough resident
# programs per SM to keep loads in flight while one waits on another.
PROGRAMS_PER_SM = 8


# A split shorter than this many blocks costs more in partial writes and
# launch than it saves.
MIN_BLOCKS_PER_SPLIT = 16


_DEFAULT_SM_COUNT = 132  # H100 SXM, when the device does not say


def sm_count() -> int:
  """Streaming multiprocessors of the default device (132 when it does not report them)."""
  try:
    count = getattr(jax.devices()[0], "core_count", None)
  except RuntimeError:
    count = None
  return int(count) if count else _DEFAULT_SM_COUNT


def auto_num_splits(programs: int, max_blocks: int, *, cores: int | None = None) -> int:
  """Splits per (row, kv head) so the grid has about PROGRAMS_PER_SM programs per SM.

  programs: batch * kv_heads; max_blocks: loop steps of the longest possible
  row. 1 (the unsplit kernel) when the grid already fills the GPU.
  """
  cores = sm_count() if cores is None else cores
  want = pl.cdiv(PROGRAMS_PER_SM * cores, max(programs, 1))
  return int(max(1, min(want, max_blocks // MIN_BLOCKS_PER_SPLIT)))


def resolve_num_splits(num_splits, *, programs: int, max_blocks: int, interpret: bool) -> int:
  """num_splits=None: automatic on a GPU, 1 (the unsplit kernel) when interpreting on CPU."""
  if num_splits is None:
    return 1 if interpret else auto_num_splits(programs, max_blocks)
  if num_splits < 1:
    raise ValueError(f"num_splits={num_splits}: must be >= 1 (or None)")
  return int(num_splits)


def split_out_specs(batch, kv_heads, num_splits, padded_group, head_dim):
  """(out_specs, out_shape) of the float32 partials m, l [B, K, P, Gp, 1] and acc [B, K, P, Gp, H]."""
  shapes = [(batch, kv_heads, num_splits, padded_group, d) for d in (1, 1, head_dim)]
  specs = [pl.BlockSpec((None, None, None, padded_group, d), lambda b, k, s: (b, k, s, 0, 0))
           for d in (1, 1, head_dim)]
  return specs, [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]


def triton_params():
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=4, num_stages=2)


def call_unsplit(kernel, operands, in_specs, sink, *, batch: int, kv_heads: int,
                 padded_group: int, head_dim: int, dtype, interpret: bool, name: str):
  """One program per (row, kv head): the unsplit Triton call, output [B, K, Gp, H]."""
  if sink is not None:
    operands = operands + [sink]
    in_specs = in_specs + [pl.BlockSpec((None, padded_group, 1), lambda b, k: (k, 0, 0))]
  return pl.pallas_call(
      kernel,
      grid=(batch, kv_heads),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, None, padded_group, head_dim), lambda b, k: (b, k, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((batch, kv_heads, padded_group, head_dim), dtype),
      compiler_params=triton_params(),
      interpret=interpret,
      name=name,
  )(*operands)  # [B, K, Gp, H]
