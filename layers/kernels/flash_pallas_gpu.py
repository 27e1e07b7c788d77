"""Flash attention as a Pallas GPU kernel (Triton lowering), forward and backward.

cuDNN (flash_gpu.py) is the fastest GPU path but cannot express segment ids,
a logit soft cap, attention sinks or chunked masks. This kernel covers them
without ever materialising [T, S] logits, so long packed sequences with those
features need neither the reference kernel's O(T * S) memory nor the pure-JAX
blockwise kernel's XLA loops.

Order of operations (as in dot_product_attention):
  logits = (q . k) * scale -> soft cap c*tanh(logits/c) -> mask (structural &
  segments) -> float32 softmax over [keys..., sink], the sink taking mass but
  adding no value. Segment 0 attends nowhere; a row with no visible key gives
  zeros (and zero gradients), never NaN.

Layout and work split:
  * forward and dq: one program per (query head, block of queries); it loops
    over the blocks of keys that the mask can reach. Causal, window and chunk
    masks shrink the loop bounds (fully masked key blocks are never loaded),
    the per-element mask only trims the diagonal tiles.
  * dkv: one program per (kv head, block of keys); it loops over the G query
    heads sharing that kv head and over the reachable query blocks, so dk / dv
    accumulate in registers and are written once (no atomics).
  * GQA / MQA: the index maps send query head n = k * G + g to kv head k; the
    G query heads of one kv head are neighbouring programs (they share K/V
    tiles through L2). K / V are never repeated in memory.
  * masks are computed inside the kernel from the position and segment ids
    of each tile; loop bounds assume positions are token indices (train mode),
    which `check_index_positions` enforces for concrete arrays.
  * backward (jax.custom_vjp): residuals are the output and the float32
    logsumexp [B, N, T]; delta = rowsum(o * do) and d(sinks) =
    -sum p_sink * delta with p_sink = exp(sink - lse) are cheap [B, N, T]
    reductions done by XLA outside the kernels.
All accumulation is float32; bf16 inputs feed bf16 tensor-core dots.
T and S are padded to the block sizes: padded keys get position -1 (never
attended) and padded query rows are dropped (their zero cotangent makes them
contribute no gradient).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from meshattn.layers.kernels.dot_product import KernelOptions
from meshattn.layers.kernels.flash_tpu import (
    check_index_positions, reject_unsupported, requested_features)
from meshattn.layers.masks import MaskSpec

PALLAS_GPU_FLASH_FEATURES = frozenset({
    "gqa", "causal", "full", "window", "chunk", "segment_ids", "soft_cap", "sinks", "backward",
    "float32"})

# Masked logits: finite, so max() over a fully masked tile stays finite; the
# probabilities of masked entries are zeroed explicitly, never by underflow.
_NEG = -1e30
# Sinks are handed to the kernel as a tiny [N, _SINK_LANES] tile (Triton
# blocks must be powers of two >= 1; a reduction of it yields the scalar).
_SINK_LANES = 16


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call: the nondiff argument of the custom VJP."""

  spec: MaskSpec
  scale: float
  soft_cap: float | None
  block_q: int
  block_kv: int
  kv_heads: int
  group: int
  has_segments: bool
  has_sinks: bool
  interpret: bool


# ---- Tile helpers (run inside the kernels) ---------------------------------------


def _tile_mask(st: _Static, q_pos, kv_pos, q_seg, kv_seg):
  """[bq, bkv] True where the query may attend the key (positions drive it)."""
  q = q_pos[:, None]  # [bq, 1]
  k = kv_pos[None, :]  # [1, bkv]
  allowed = k >= 0  # [1, bkv]
  if st.spec.is_causal:
    allowed = allowed & (k <= q)  # [bq, bkv]
  if st.spec.attention_type == "local_sliding":
    allowed = allowed & (q - k < st.spec.window)
  elif st.spec.attention_type == "chunk":
    # Positions of visible keys are >= 0, so truncating division is floor.
    allowed = allowed & (lax.div(q, st.spec.chunk) == lax.div(jnp.maximum(k, 0), st.spec.chunk))
  if st.has_segments:
    allowed = allowed & (q_seg[:, None] == kv_seg[None, :]) & (q_seg[:, None] != 0)
  return jnp.broadcast_to(allowed, (q_pos.shape[0], kv_pos.shape[0]))  # [bq, bkv]


def _logits(st: _Static, q, k):
  """Scaled, soft-capped float32 logits of one tile and tanh (for the cap's derivative)."""
  s = _dot(q, k, trans_b=True) * st.scale  # [bq, bkv] f32
  if not st.soft_cap:
    return s, None
  t = jnp.tanh(s / st.soft_cap)  # [bq, bkv]
  return st.soft_cap * t, t


def _dot(a, b, *, trans_a=False, trans_b=False):
  """a @ b with float32 accumulation; exact float32 (no TF32) for float32 inputs."""
  tf32 = False if a.dtype == jnp.float32 else None
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=tf32).astype(jnp.float32)


def _kv_bounds(st: _Static, q_block, num_kv_blocks):
  """[lo, hi) key blocks a query block can see (token-index positions)."""
  first_q = q_block * st.block_q
  last_q = first_q + st.block_q - 1
  kind = st.spec.attention_type
  if kind == "full":
    return 0, num_kv_blocks
  hi = jnp.minimum(lax.div(last_q, st.block_kv) + 1, num_kv_blocks)
  if kind == "local_sliding":
    lo = lax.div(jnp.maximum(first_q - st.spec.window + 1, 0), st.block_kv)
  elif kind == "chunk":
    lo = lax.div(lax.div(first_q, st.spec.chunk) * st.spec.chunk, st.block_kv)
  else:
    lo = 0
  return lo, hi


def _q_bounds(st: _Static, kv_block, num_q_blocks):
  """[lo, hi) query blocks that can see a key block (token-index positions)."""
  first_k = kv_block * st.block_kv
  last_k = first_k + st.block_kv - 1
  kind = st.spec.attention_type
  if kind == "full":
    return 0, num_q_blocks
  lo = lax.div(first_k, st.block_q)
  if kind == "local_sliding":
    hi = jnp.minimum(lax.div(last_k + st.spec.window - 1, st.block_q) + 1, num_q_blocks)
  elif kind == "chunk":
    last_q = (lax.div(last_k, st.spec.chunk) + 1) * st.spec.chunk - 1
    hi = jnp.minimum(lax.div(last_q, st.block_q) + 1, num_q_blocks)
  else:
    hi = num_q_blocks
  return lo, hi


def _sink_value(sink_ref):
  return jnp.max(sink_ref[...].astype(jnp.float32))  # every lane holds the same sink


def _unpack(st: _Static, refs, names):
  """Name the positional refs of a kernel (optional ones only when present)."""
  refs = list(refs)
  out = {}
  for name in names:
    if name in ("q_seg", "kv_seg") and not st.has_segments:
      out[name] = None
    elif name == "sink" and not st.has_sinks:
      out[name] = None
    else:
      out[name] = refs.pop(0)
  assert not refs
  return out


# ---- Forward ---------------------------------------------------------------------


def _fwd_kernel(*refs, st: _Static, num_kv_blocks: int):
  r = _unpack(st, refs, ("q", "k", "v", "q_pos", "kv_pos", "q_seg", "kv_seg", "sink", "o", "lse"))
  q_block = pl.program_id(1)
  q = r["q"][...]  # [bq, H]
  q_pos = r["q_pos"][...]  # [bq]
  q_seg = None if r["q_seg"] is None else r["q_seg"][...]  # [bq]
  head_dim = q.shape[-1]

  if st.has_sinks:
    # The sink is the first "key": the running max starts at it with mass 1.
    m = jnp.full((st.block_q,), _sink_value(r["sink"]), jnp.float32)  # [bq]
    l = jnp.ones((st.block_q,), jnp.float32)  # [bq]
  else:
    m = jnp.full((st.block_q,), _NEG, jnp.float32)  # [bq]
    l = jnp.zeros((st.block_q,), jnp.float32)  # [bq]
  acc = jnp.zeros((st.block_q, head_dim), jnp.float32)  # [bq, H]

  def body(j, carry):
    acc, m, l = carry
    kv_slice = pl.ds(j * st.block_kv, st.block_kv)
    k = r["k"][kv_slice, :]  # [bkv, H]
    v = r["v"][kv_slice, :]  # [bkv, H]
    s, _ = _logits(st, q, k)  # [bq, bkv]
    kv_seg = None if r["kv_seg"] is None else r["kv_seg"][kv_slice]
    allowed = _tile_mask(st, q_pos, r["kv_pos"][kv_slice], q_seg, kv_seg)  # [bq, bkv]
    s = jnp.where(allowed, s, _NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # [bq]
    p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)  # [bq, bkv]
    rescale = jnp.exp(m - m_new)  # [bq]
    l = l * rescale + jnp.sum(p, axis=-1)
    acc = acc * rescale[:, None] + _dot(p.astype(v.dtype), v)  # [bq, H]
    return acc, m_new, l

  lo, hi = _kv_bounds(st, q_block, num_kv_blocks)
  acc, m, l = lax.fori_loop(lo, hi, body, (acc, m, l))
  # No visible key and no sink: l == 0, the row is zeros and lse = +inf makes
  # every recomputed probability exp(s - inf) = 0 in the backward.
  has_mass = l > 0.0
  safe_l = jnp.where(has_mass, l, 1.0)
  r["o"][...] = (acc / safe_l[:, None]).astype(r["o"].dtype)  # [bq, H]
  r["lse"][...] = jnp.where(has_mass, m + jnp.log(safe_l), jnp.inf)  # [bq]


def _common_inputs(st: _Static, q_pos, kv_pos, q_seg, kv_seg, sinks_tile):
  """The optional per-call arrays in kernel argument order."""
  arrays = [q_pos, kv_pos]
  if st.has_segments:
    arrays += [q_seg, kv_seg]
  if st.has_sinks:
    arrays.append(sinks_tile)
  return arrays


def _compiler_params(st: _Static, head_dim: int):
  if st.interpret:
    return None
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def _per_q_head_specs(st: _Static, q_len: int, kv_len: int, head_dim: int):
  """BlockSpecs of the grid (G, T / bq, B * K): one query head, one query block."""
  kh, bq = st.kv_heads, st.block_q

  def head(g, bk):
    return (bk % kh) * st.group + g

  specs = {
      "q": pl.BlockSpec((None, bq, None, head_dim), lambda g, i, bk: (bk // kh, i, head(g, bk), 0)),
      "kv": pl.BlockSpec((None, kv_len, None, head_dim), lambda g, i, bk: (bk // kh, 0, bk % kh, 0)),
      "q_vec": pl.BlockSpec((None, bq), lambda g, i, bk: (bk // kh, i)),
      "kv_vec": pl.BlockSpec((None, kv_len), lambda g, i, bk: (bk // kh, 0)),
      "sink": pl.BlockSpec((None, _SINK_LANES), lambda g, i, bk: (head(g, bk), 0)),
      "row": pl.BlockSpec((None, None, bq), lambda g, i, bk: (bk // kh, head(g, bk), i)),
  }
  del q_len
  return specs


def _optional_specs(st: _Static, specs):
  out = [specs["q_vec"], specs["kv_vec"]]
  if st.has_segments:
    out += [specs["q_vec"], specs["kv_vec"]]
  if st.has_sinks:
    out.append(specs["sink"])
  return out


def _forward(st: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg, sinks_tile):
  """o [B, T, N, H], lse [B, N, T] float32 (all lengths already padded)."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len = k.shape[1]
  specs = _per_q_head_specs(st, q_len, kv_len, head_dim)
  grid = (st.group, q_len // st.block_q, batch * st.kv_heads)
  num_kv_blocks = kv_len // st.block_kv
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, num_kv_blocks=num_kv_blocks),
      grid=grid,
      in_specs=[specs["q"], specs["kv"], specs["kv"]] + _optional_specs(st, specs),
      out_specs=[specs["q"], specs["row"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)],
      compiler_params=_compiler_params(st, head_dim),
      interpret=st.interpret,
      name="flash_pallas_gpu_fwd",
  )(q, k, v, *_common_inputs(st, q_pos, kv_pos, q_seg, kv_seg, sinks_tile))


# ---- Backward --------------------------------------------------------------------


def _probs_and_dlogits(st: _Static, q, k, v, do, lse, delta, allowed):
  """Recompute p [bq, bkv] and d(raw scaled logits) of one tile.

  ds = p * (dp - delta) is the softmax backward (the sink column adds no
  value, so delta = rowsum(o * do) already is sum_j p_j dp_j); the soft cap
  multiplies by its derivative 1 - tanh^2.
  """
  s, t = _logits(st, q, k)  # [bq, bkv]
  p = jnp.where(allowed, jnp.exp(s - lse[:, None]), 0.0)  # [bq, bkv]
  dp = _dot(do, v, trans_b=True)  # [bq, bkv]
  ds = p * (dp - delta[:, None])  # [bq, bkv]
  if t is not None:
    ds = ds * (1.0 - t * t)
  return p, ds * st.scale


def _dq_kernel(*refs, st: _Static, num_kv_blocks: int):
  r = _unpack(st, refs, ("q", "k", "v", "q_pos", "kv_pos", "q_seg", "kv_seg", "do", "lse",
                         "delta", "dq"))
  q_block = pl.program_id(1)
  q = r["q"][...]  # [bq, H]
  do = r["do"][...]  # [bq, H]
  lse = r["lse"][...]  # [bq]
  delta = r["delta"][...]  # [bq]
  q_pos = r["q_pos"][...]
  q_seg = None if r["q_seg"] is None else r["q_seg"][...]

  def body(j, dq):
    kv_slice = pl.ds(j * st.block_kv, st.block_kv)
    k = r["k"][kv_slice, :]  # [bkv, H]
    v = r["v"][kv_slice, :]  # [bkv, H]
    kv_seg = None if r["kv_seg"] is None else r["kv_seg"][kv_slice]
    allowed = _tile_mask(st, q_pos, r["kv_pos"][kv_slice], q_seg, kv_seg)  # [bq, bkv]
    _, ds = _probs_and_dlogits(st, q, k, v, do, lse, delta, allowed)
    return dq + _dot(ds.astype(k.dtype), k)  # [bq, H]

  lo, hi = _kv_bounds(st, q_block, num_kv_blocks)
  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, jnp.float32))
  r["dq"][...] = dq.astype(r["dq"].dtype)


def _dkv_kernel(*refs, st: _Static, num_q_blocks: int):
  r = _unpack(st, refs, ("q", "k", "v", "q_pos", "kv_pos", "q_seg", "kv_seg", "do", "lse",
                         "delta", "dk", "dv"))
  kv_block = pl.program_id(0)
  k = r["k"][...]  # [bkv, H]
  v = r["v"][...]  # [bkv, H]
  kv_pos = r["kv_pos"][...]  # [bkv]
  kv_seg = None if r["kv_seg"] is None else r["kv_seg"][...]
  lo, hi = _q_bounds(st, kv_block, num_q_blocks)

  def q_body(i, carry, g):
    dk, dv = carry
    q_slice = pl.ds(i * st.block_q, st.block_q)
    q = r["q"][q_slice, g, :]  # [bq, H]
    do = r["do"][q_slice, g, :]  # [bq, H]
    lse = r["lse"][g, q_slice]  # [bq]
    delta = r["delta"][g, q_slice]  # [bq]
    q_seg = None if r["q_seg"] is None else r["q_seg"][q_slice]
    allowed = _tile_mask(st, r["q_pos"][q_slice], kv_pos, q_seg, kv_seg)  # [bq, bkv]
    p, ds = _probs_and_dlogits(st, q, k, v, do, lse, delta, allowed)
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)  # [bkv, H]
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)  # [bkv, H]
    return dk, dv

  def g_body(g, carry):
    return lax.fori_loop(lo, hi, functools.partial(q_body, g=g), carry)

  zeros = jnp.zeros(k.shape, jnp.float32)  # [bkv, H]
  dk, dv = lax.fori_loop(0, st.group, g_body, (zeros, zeros))
  r["dk"][...] = dk.astype(r["dk"].dtype)
  r["dv"][...] = dv.astype(r["dv"].dtype)


def _backward_kernels(st: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse, do):
  """dq [B, T, N, H], dk / dv [B, S, K, H] and delta [B, N, T] (float32)."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len = k.shape[1]
  kh, g_, bq, bkv = st.kv_heads, st.group, st.block_q, st.block_kv
  delta = jnp.einsum("BTNH,BTNH->BNT", o.astype(jnp.float32),
                     do.astype(jnp.float32))  # [B, N, T]
  no_sink = dataclasses.replace(st, has_sinks=False)  # d(sinks) is computed outside the kernels
  optional = _common_inputs(no_sink, q_pos, kv_pos, q_seg, kv_seg, None)
  params = _compiler_params(st, head_dim)

  specs = _per_q_head_specs(st, q_len, kv_len, head_dim)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, num_kv_blocks=kv_len // bkv),
      grid=(g_, q_len // bq, batch * kh),
      in_specs=([specs["q"], specs["kv"], specs["kv"]] + _optional_specs(no_sink, specs)
                + [specs["q"], specs["row"], specs["row"]]),
      out_specs=specs["q"],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=st.interpret,
      name="flash_pallas_gpu_dq",
  )(q, k, v, *optional, do, lse, delta)

  # dkv grid (S / bkv, B * K): the G query heads of the kv head are a loop.
  q5 = q.reshape(batch, q_len, kh, g_, head_dim)  # [B, T, K, G, H]
  do5 = do.reshape(batch, q_len, kh, g_, head_dim)  # [B, T, K, G, H]
  lse4 = lse.reshape(batch, kh, g_, q_len)  # [B, K, G, T]
  delta4 = delta.reshape(batch, kh, g_, q_len)  # [B, K, G, T]
  q_all = pl.BlockSpec((None, q_len, None, g_, head_dim), lambda j, bk: (bk // kh, 0, bk % kh, 0, 0))
  kv_tile = pl.BlockSpec((None, bkv, None, head_dim), lambda j, bk: (bk // kh, j, bk % kh, 0))
  q_vec = pl.BlockSpec((None, q_len), lambda j, bk: (bk // kh, 0))
  kv_vec = pl.BlockSpec((None, bkv), lambda j, bk: (bk // kh, j))
  rows = pl.BlockSpec((None, None, g_, q_len), lambda j, bk: (bk // kh, bk % kh, 0, 0))
  vec_specs = [q_vec, kv_vec] + ([q_vec, kv_vec] if st.has_segments else [])
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, num_q_blocks=q_len // bq),
      grid=(kv_len // bkv, batch * kh),
      in_specs=[q_all, kv_tile, kv_tile] + vec_specs + [q_all, rows, rows],
      out_specs=[kv_tile, kv_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=st.interpret,
      name="flash_pallas_gpu_dkv",
  )(q5, k, v, *optional, do5, lse4, delta4)
  del num_heads
  return dq, dk, dv, delta


# ---- custom VJP ------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg):
  return _flash_fwd(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg)[0]


def _sinks_tile(st: _Static, sinks):
  if not st.has_sinks:
    return None
  return jnp.broadcast_to(sinks.astype(jnp.float32)[:, None], (sinks.shape[0], _SINK_LANES))


def _flash_fwd(st: _Static, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg):
  o, lse = _forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, _sinks_tile(st, sinks))
  return o, (q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, o, lse)


def _flash_bwd(st: _Static, res, do):
  q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, o, lse = res
  dq, dk, dv, delta = _backward_kernels(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, o, lse, do)
  dsinks = None
  if st.has_sinks:
    # d sink_n = sum_{b,t} p_sink * (0 - delta): the sink column's value is 0.
    p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse)  # [B, N, T]
    dsinks = (-(p_sink * delta).sum(axis=(0, 2))).astype(sinks.dtype)  # [N]
  int_zero = lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)
  return (dq, dk, dv, dsinks, int_zero(q_pos), int_zero(kv_pos), int_zero(q_seg),
          int_zero(kv_seg))


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---- Public entry point ----------------------------------------------------------


def _pad_to(x, length: int, axis: int, value):
  extra = length - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def pallas_gpu_flash_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    options: KernelOptions,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sinks: jax.Array | None = None,
    mask: jax.Array | None = None,
    bias: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
    deterministic: bool = True,
    return_weights: bool = False,
    block_q: int = 128,
    block_kv: int = 64,
    interpret: bool = False,
) -> tuple[jax.Array, None]:
  """Flash attention of query [B, T, N, H] over key/value [B, S, K, H] in Pallas/Triton.

  Same arguments and results as `dot_product_attention` (weights are always
  None), plus power-of-two tile sizes block_q / block_kv (shrunk to the padded
  lengths for short inputs) and `interpret` (run the kernels in the Pallas
  interpreter: any backend, for tests). Features outside
  PALLAS_GPU_FLASH_FEATURES raise ValueError naming them.
  """
  del dropout_rng  # dropout is refused below
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  if num_heads % kv_heads:
    raise ValueError(f"query heads {num_heads} must be a multiple of kv heads {kv_heads}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together")
  requested = requested_features(
      query, key, options=options, q_segment_ids=q_segment_ids, sinks=sinks, mask=mask,
      bias=bias, deterministic=deterministic, return_weights=return_weights)
  reject_unsupported("pallas_gpu_flash_attention", PALLAS_GPU_FLASH_FEATURES, requested)
  if options.mask.is_causal:
    # Loop bounds skip key blocks by token index; other positions would be wrong.
    check_index_positions(q_positions, kv_positions, q_len, kv_len, "pallas_gpu_flash_attention")
  if head_dim < 16 or head_dim & (head_dim - 1) or value.shape[-1] != head_dim:
    raise ValueError(f"pallas_gpu_flash_attention needs one power-of-two head dim >= 16 for q, k "
                     f"and v, got {head_dim} / {value.shape[-1]}")
  for name, size in (("block_q", block_q), ("block_kv", block_kv)):
    if size < 16 or size & (size - 1):
      raise ValueError(f"{name}={size}: must be a power of two >= 16")

  # Short inputs: shrink the tiles (still powers of two) rather than pad a lot.
  block_q = min(block_q, max(16, pl.next_power_of_2(q_len)))
  block_kv = min(block_kv, max(16, pl.next_power_of_2(kv_len)))
  t_pad, s_pad = _round_up(q_len, block_q), _round_up(kv_len, block_kv)
  st = _Static(spec=options.mask, scale=float(options.scale), soft_cap=options.soft_cap or None,
               block_q=block_q, block_kv=block_kv, kv_heads=kv_heads,
               group=num_heads // kv_heads, has_segments=q_segment_ids is not None,
               has_sinks=sinks is not None, interpret=interpret)

  q_pos = jnp.broadcast_to(q_positions.astype(jnp.int32), (batch, q_len))  # [B, T]
  kv_pos = jnp.broadcast_to(kv_positions.astype(jnp.int32), (batch, kv_len))  # [B, S]
  # Padding queries continue the token index; padding keys are empty slots.
  q_pos = jnp.concatenate(
      [q_pos, jnp.broadcast_to(jnp.arange(q_len, t_pad, dtype=jnp.int32), (batch, t_pad - q_len))],
      axis=1)  # [B, T']
  kv_pos = _pad_to(kv_pos, s_pad, 1, -1)  # [B, S']
  q_seg = kv_seg = None
  if st.has_segments:
    q_seg = _pad_to(q_segment_ids.astype(jnp.int32), t_pad, 1, 0)  # [B, T']
    kv_seg = _pad_to(kv_segment_ids.astype(jnp.int32), s_pad, 1, 0)  # [B, S']
  q = _pad_to(query, t_pad, 1, 0)  # [B, T', N, H]
  k = _pad_to(key, s_pad, 1, 0)  # [B, S', K, H]
  v = _pad_to(value, s_pad, 1, 0)  # [B, S', K, H]
  context = _flash(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg)  # [B, T', N, H]
  return context[:, :q_len], None
