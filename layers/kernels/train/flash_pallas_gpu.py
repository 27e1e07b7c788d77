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
    over the blocks of keys that the mask can reach. dkv: one program per (kv
    head, block of keys); it loops over the G query heads sharing that kv head
    and over the reachable query blocks, so dk / dv accumulate in registers
    and are written once (no atomics).
  * which blocks (flash_bounds.py): causal, window and chunk masks bound the
    loops in closed form (positions are token indices in train mode, which
    `check_index_positions` enforces for concrete arrays); segment ids bound
    them per block from data computed before the pallas_call, for arbitrary
    (not only contiguous) ids. Fully masked blocks are never loaded.
  * interior tiles, where the mask allows every pair (below the causal
    diagonal, inside the window / chunk, inside one segment), skip the
    per-element mask; only the edge tiles build it from positions and ids.
  * GQA / MQA: the index maps send query head n = k * G + g to kv head k; the
    G query heads of one kv head are neighbouring programs (they share K/V
    tiles through L2). K / V are never repeated in memory.
  * logits live in log2 units (log2(e) folded into the scale) so the softmax
    runs on exp2; the soft cap applies to natural-unit logits first, through
    tanh.approx.f32 for 16-bit inputs on GPU.
  * backward (jax.custom_vjp; the kernels are in flash_pallas_gpu_bwd.py):
    residuals are the output and the float32 logsumexp [B, N, T] (natural
    units); delta = rowsum(o * do) and d(sinks) = -sum p_sink * delta with
    p_sink = exp(sink - lse) are cheap [B, N, T] reductions done by XLA
    outside the kernels. dq and dkv take their own tiles and Triton settings.
  * tiles (flash_pallas_gpu_tiles.py): chosen per head_dim and dtype so that
    each kernel's shared memory fits the GPU's per-block limit (227 KB on
    Hopper); explicit tiles that cannot fit raise ValueError before compiling.
All accumulation is float32; bf16 inputs feed bf16 tensor-core dots.
T and S are padded to the block sizes: padded keys get position -1 (never
attended) and padded query rows are dropped (their zero cotangent makes them
contribute no gradient).
Invisible tokens (segment 0, key position -1) may hold NaN / inf: v is selected
away before the forward kernel, q, k and the cotangent before the backward ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from meshattn.layers.kernels.train import flash_bounds as fb
from meshattn.layers.kernels.api import KernelOptions, TrainCall, train_kernel
from meshattn.layers.kernels.registry import GPU, HALF_DTYPES, Limits, Request, train_variant
from meshattn.layers.kernels.shared.lazy_import import lazy_module
from meshattn.layers.kernels.train.flash_pallas_gpu_tiles import (
    call_tiles, shared_memory_limit, unsupported)
from meshattn.layers.kernels.shared.live_tokens import keys_with_rows, rows_with_keys
from meshattn.layers.kernels.shared.online_softmax import NEG, hide
from meshattn.layers.masks import MaskSpec

# Imported when a kernel is built (registry discovery imports this module on every host).
plgpu = lazy_module("jax.experimental.pallas.triton")

# What cuDNN and tokamax cannot express: chunk masks, segment ids, sinks, float32 inputs.
PALLAS_GPU_FLASH_FEATURES = frozenset({
    "gqa", "causal", "full", "window", "chunk", "segment_ids", "soft_cap", "sinks", "backward",
    "float32"})


def _fits(request: Request) -> str | None:
  # The tiles chosen for this head_dim / dtype and the shared memory they need against the
  # GPU's per-block limit (pure Python: no Pallas import).
  return unsupported(request.head_dim, request.input_dtype,
                     backward="backward" in request.features, limit=shared_memory_limit())


PALLAS_GPU_FLASH_LIMITS = Limits(
    GPU, min_head_dim=16, max_head_dim=256, head_dim_power_of_two=True,
    dtypes=frozenset({"float32"}) | HALF_DTYPES, fits=_fits,
    why="Triton block shapes; tiles per head_dim that fit shared memory (flash_pallas_gpu_tiles)")



def _masks_by_index(options: KernelOptions) -> bool:
  """Causal loop bounds skip key blocks by token index: positions must be the indices."""
  return options.mask.is_causal


# Sinks are handed to the kernel as a tiny [N, _SINK_LANES] tile (Triton
# blocks must be powers of two >= 1; a reduction of it yields the scalar).
_SINK_LANES = 16
# The kernels keep logits in log2 units (natural logits * log2(e)) so the
# softmax runs on exp2; lse is stored in natural units.
_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything static about one call: the nondiff argument of the custom VJP.

  block_* / num_* are the forward's; `backward()` swaps in the dq ones (*_bwd) and
  `dkv()` the dkv ones.
  """

  spec: MaskSpec
  scale: float
  soft_cap: float | None
  block_q: int
  block_kv: int
  kv_heads: int
  group: int
  kv_len: int  # unpadded: the key blocks below kv_len // block_kv hold no padding
  has_segments: bool
  has_sinks: bool
  fast_tanh: bool  # tanh.approx.f32 (GPU, 16-bit inputs): one MUFU op instead of libdevice tanh
  num_warps: int
  num_stages: int
  block_q_bwd: int  # dq
  block_kv_bwd: int
  block_q_dkv: int
  block_kv_dkv: int
  num_warps_bwd: int
  num_stages_bwd: int
  interpret: bool

  @property
  def has_bounds(self) -> bool:
    """Whether the kernels get data bounds (flash_bounds) besides the structural ones."""
    return self.has_segments or not self.spec.is_causal

  def backward(self) -> _Static:
    return dataclasses.replace(self, block_q=self.block_q_bwd, block_kv=self.block_kv_bwd,
                               num_warps=self.num_warps_bwd, num_stages=self.num_stages_bwd)

  def dkv(self) -> _Static:
    return dataclasses.replace(self.backward(), block_q=self.block_q_dkv,
                               block_kv=self.block_kv_dkv)


# ---- Tile helpers (run inside the kernels) ---------------------------------------


def _tile_mask(st: _Static, q_pos, kv_pos, q_seg, kv_seg):
  """[bq, bkv] True where the query may attend the key (positions drive it)."""
  q = q_pos[:, None]  # [bq, 1]
  k = kv_pos[None, :]  # [1, bkv]
  allowed = k >= 0  # [1, bkv]
  if st.spec.is_causal:
    allowed = allowed & (k <= q)  # [bq, bkv]
  if st.spec.window:
    allowed = allowed & (q - k < st.spec.window)
  elif st.spec.chunk:
    # Positions of visible keys are >= 0, so truncating division is floor.
    allowed = allowed & (lax.div(q, st.spec.chunk) == lax.div(jnp.maximum(k, 0), st.spec.chunk))
  if st.has_segments:
    allowed = allowed & (q_seg[:, None] == kv_seg[None, :]) & (q_seg[:, None] != 0)
  return jnp.broadcast_to(allowed, (q_pos.shape[0], kv_pos.shape[0]))  # [bq, bkv]


def _logits(st: _Static, q, k):
  """Scaled, soft-capped float32 logits of one tile in log2 units, and tanh (for the cap's
  derivative). The cap applies to natural-unit logits: log2(e) multiplies its output."""
  s = _dot(q, k, trans_b=True)  # [bq, bkv] f32
  if not st.soft_cap:
    return s * (st.scale * _LOG2E), None
  t = s * (st.scale / st.soft_cap)  # [bq, bkv]
  t = plgpu.approx_tanh(t) if st.fast_tanh else jnp.tanh(t)
  return t * (st.soft_cap * _LOG2E), t


def _dot(a, b, *, trans_a=False, trans_b=False):
  """a @ b with float32 accumulation; exact float32 (no TF32) for float32 inputs."""
  tf32 = False if a.dtype == jnp.float32 else None
  return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, allow_tf32=tf32).astype(jnp.float32)


def _tile_loops(ranges, body, carry):
  """body(j, carry, masked=...) over the blocks [lo, hi) of ranges = (lo, a, c, hi).

  The interior [a, c) runs first without the mask; the edge blocks [lo, a) and
  [c, hi) share one masked loop (one copy of the masked body, not two).
  """
  lo, a, c, hi = ranges
  carry = lax.fori_loop(a, c, functools.partial(body, masked=False), carry)
  before = a - lo

  def edge(n, carry):
    return body(jnp.where(n < before, lo + n, c + n - before), carry, masked=True)

  return lax.fori_loop(0, before + hi - c, edge, carry)


def _data_bounds(ref):
  """The (lo, hi, a, c) scalars of this program's data bounds (or None)."""
  return None if ref is None else tuple(ref[n] for n in range(4))


def _kv_ranges(st: _Static, bounds_ref, q_block, num_kv_blocks: int):
  """(lo, a, c, hi) key blocks of a query block (forward, dq)."""
  return fb.loop_ranges(
      fb.kv_block_range(st.spec, st.block_q, st.block_kv, q_block, num_kv_blocks),
      fb.kv_block_interior(st.spec, st.block_q, st.block_kv, q_block, st.kv_len // st.block_kv),
      _data_bounds(bounds_ref))


def _q_ranges(st: _Static, bounds_ref, kv_block, num_q_blocks: int):
  """(lo, a, c, hi) query blocks of a key block (dkv)."""
  return fb.loop_ranges(
      fb.q_block_range(st.spec, st.block_q, st.block_kv, kv_block, num_q_blocks),
      fb.q_block_interior(st.spec, st.block_q, st.block_kv, kv_block, num_q_blocks,
                          st.kv_len // st.block_kv),
      _data_bounds(bounds_ref))


def _sink_value(sink_ref):
  return jnp.max(sink_ref[...].astype(jnp.float32))  # every lane holds the same sink


def _unpack(st: _Static, refs, names):
  """Name the positional refs of a kernel (optional ones only when present)."""
  refs = list(refs)
  out = {}
  for name in names:
    if ((name in ("q_seg", "kv_seg") and not st.has_segments)
        or (name == "sink" and not st.has_sinks) or (name == "bounds" and not st.has_bounds)):
      out[name] = None
    else:
      out[name] = refs.pop(0)
  assert not refs
  return out


# ---- Forward ---------------------------------------------------------------------


def _fwd_kernel(*refs, st: _Static, num_kv_blocks: int):
  r = _unpack(st, refs, ("q", "k", "v", "q_pos", "kv_pos", "q_seg", "kv_seg", "bounds", "sink",
                         "o", "lse"))
  q = r["q"][...]  # [bq, H]
  q_pos = r["q_pos"][...]  # [bq]
  q_seg = None if r["q_seg"] is None else r["q_seg"][...]  # [bq]
  head_dim = q.shape[-1]

  if st.has_sinks:
    # The sink is the first "key": the running max starts at it with mass 1.
    m = jnp.full((st.block_q,), _sink_value(r["sink"]) * _LOG2E, jnp.float32)  # [bq]
    l = jnp.ones((st.block_q,), jnp.float32)  # [bq]
  else:
    m = jnp.full((st.block_q,), NEG, jnp.float32)  # [bq]
    l = jnp.zeros((st.block_q,), jnp.float32)  # [bq]
  acc = jnp.zeros((st.block_q, head_dim), jnp.float32)  # [bq, H]

  def body(j, carry, *, masked):
    acc, m, l = carry
    kv_slice = pl.ds(j * st.block_kv, st.block_kv)
    k = r["k"][kv_slice, :]  # [bkv, H]
    v = r["v"][kv_slice, :]  # [bkv, H]
    s, _ = _logits(st, q, k)  # [bq, bkv] log2 units
    if masked:
      kv_seg = None if r["kv_seg"] is None else r["kv_seg"][kv_slice]
      allowed = _tile_mask(st, q_pos, r["kv_pos"][kv_slice], q_seg, kv_seg)  # [bq, bkv]
      s = jnp.where(allowed, s, NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # [bq]
    p = jnp.exp2(s - m_new[:, None])  # [bq, bkv]
    if masked:
      p = jnp.where(allowed, p, 0.0)
    rescale = jnp.exp2(m - m_new)  # [bq]
    l = l * rescale + jnp.sum(p, axis=-1)
    acc = acc * rescale[:, None] + _dot(p.astype(v.dtype), v)  # [bq, H]
    return acc, m_new, l

  ranges = _kv_ranges(st, r["bounds"], pl.program_id(1), num_kv_blocks)
  acc, m, l = _tile_loops(ranges, body, (acc, m, l))
  # No visible key and no sink: l == 0, the row is zeros and lse = +inf makes
  # every recomputed probability exp(s - inf) = 0 in the backward.
  has_mass = l != 0.0  # not `> 0`: a NaN that reached a visible key stays NaN
  safe_l = jnp.where(has_mass, l, 1.0)
  r["o"][...] = (acc / safe_l[:, None]).astype(r["o"].dtype)  # [bq, H]
  r["lse"][...] = jnp.where(has_mass, m * _LN2 + jnp.log(safe_l), jnp.inf)  # [bq] natural units


def _common_inputs(st: _Static, q_pos, kv_pos, q_seg, kv_seg, bounds, sinks_tile):
  """The optional per-call arrays in kernel argument order."""
  arrays = [q_pos, kv_pos]
  if st.has_segments:
    arrays += [q_seg, kv_seg]
  if st.has_bounds:
    arrays.append(bounds)
  if st.has_sinks:
    arrays.append(sinks_tile)
  return arrays


def _compiler_params(st: _Static):
  if st.interpret:
    return None
  return plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


def _per_q_head_specs(st: _Static, kv_len: int, head_dim: int):
  """BlockSpecs of the grid (G, T / bq, B * K): one query head, one query block."""
  kh, bq = st.kv_heads, st.block_q

  def head(g, bk):
    return (bk % kh) * st.group + g

  return {
      "q": pl.BlockSpec((None, bq, None, head_dim), lambda g, i, bk: (bk // kh, i, head(g, bk), 0)),
      "kv": pl.BlockSpec((None, kv_len, None, head_dim),
                         lambda g, i, bk: (bk // kh, 0, bk % kh, 0)),
      "q_vec": pl.BlockSpec((None, bq), lambda g, i, bk: (bk // kh, i)),
      "kv_vec": pl.BlockSpec((None, kv_len), lambda g, i, bk: (bk // kh, 0)),
      "bounds": pl.BlockSpec((None, 4), lambda g, i, bk: (bk // kh, i)),
      "sink": pl.BlockSpec((None, _SINK_LANES), lambda g, i, bk: (head(g, bk), 0)),
      "row": pl.BlockSpec((None, None, bq), lambda g, i, bk: (bk // kh, head(g, bk), i)),
  }


def _optional_specs(st: _Static, specs):
  out = [specs["q_vec"], specs["kv_vec"]]
  if st.has_segments:
    out += [specs["q_vec"], specs["kv_vec"]]
  if st.has_bounds:
    out.append(specs["bounds"])
  if st.has_sinks:
    out.append(specs["sink"])
  return out


def _kv_bounds_input(st: _Static, q_len: int, kv_pos, q_seg, kv_seg, ranges):
  return fb.kv_data_bounds(st.spec, st.block_q, st.block_kv, q_len // st.block_q, kv_pos, q_seg,
                           kv_seg, ranges)  # [B, nq * 4] or None


def _forward(st: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg, ranges, sinks_tile):
  """o [B, T, N, H], lse [B, N, T] float32 (all lengths already padded)."""
  batch, q_len, num_heads, head_dim = q.shape
  kv_len = k.shape[1]
  specs = _per_q_head_specs(st, kv_len, head_dim)
  bounds = _kv_bounds_input(st, q_len, kv_pos, q_seg, kv_seg, ranges)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st, num_kv_blocks=kv_len // st.block_kv),
      grid=(st.group, q_len // st.block_q, batch * st.kv_heads),
      in_specs=[specs["q"], specs["kv"], specs["kv"]] + _optional_specs(st, specs),
      out_specs=[specs["q"], specs["row"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32)],
      compiler_params=_compiler_params(st),
      interpret=st.interpret,
      name="flash_pallas_gpu_fwd",
  )(q, k, v, *_common_inputs(st, q_pos, kv_pos, q_seg, kv_seg, bounds, sinks_tile))


# ---- custom VJP ------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, ranges, live_q, live_k):
  return _flash_fwd(st, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, ranges, live_q, live_k)[0]


def _sinks_tile(st: _Static, sinks):
  if not st.has_sinks:
    return None
  return jnp.broadcast_to(sinks.astype(jnp.float32)[:, None], (sinks.shape[0], _SINK_LANES))


def _flash_fwd(st: _Static, q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, ranges, live_q, live_k):
  # live_q / live_k [B, T' | S', 1, 1] or None. Only V meets a zeroed p; NaN q / k meet the mask.
  v = v if live_k is None else hide(v, live_k)  # [B, S', K, H]
  o, lse = _forward(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, ranges, _sinks_tile(st, sinks))
  return o, (q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, ranges, live_q, live_k, o, lse)


def _flash_bwd(st: _Static, res, do):
  # The backward file imports this one's tile helpers, so it is imported here, not on top.
  # pylint: disable-next=import-outside-toplevel
  from meshattn.layers.kernels.train.flash_pallas_gpu_bwd import backward_kernels
  q, k, v, sinks, q_pos, kv_pos, q_seg, kv_seg, ranges, live_q, live_k, o, lse = res
  # Zeroed p / dLogits meet dO, K and Q here (0 * NaN = NaN): dead rows' q, dO and dead k go.
  if live_q is not None:
    q, do = hide(q, live_q), hide(do, live_q)  # [B, T', N, H]
  k = k if live_k is None else hide(k, live_k)  # [B, S', K, H]
  dq, dk, dv, delta = backward_kernels(st, q, k, v, q_pos, kv_pos, q_seg, kv_seg, ranges, o,
                                       lse, do)
  dsinks = None
  if st.has_sinks:
    # d sink_n = sum_{b,t} p_sink * (0 - delta): the sink column's value is 0.
    p_sink = jnp.exp(sinks.astype(jnp.float32)[None, :, None] - lse)  # [B, N, T]
    dsinks = (-(p_sink * delta).sum(axis=(0, 2))).astype(sinks.dtype)  # [N]
  int_zero = lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0)
  return (dq, dk, dv, dsinks, int_zero(q_pos), int_zero(kv_pos), int_zero(q_seg),
          int_zero(kv_seg), jax.tree.map(int_zero, ranges), int_zero(live_q), int_zero(live_k))


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


@train_variant("flash", GPU, PALLAS_GPU_FLASH_FEATURES, "Pallas GPU (Triton)",
               limits=PALLAS_GPU_FLASH_LIMITS)
@train_kernel("pallas_gpu_flash_attention", PALLAS_GPU_FLASH_FEATURES,
              index_masked=_masks_by_index)
def pallas_gpu_flash_attention(query: jax.Array, key: jax.Array, value: jax.Array, call: TrainCall,
                               *, block_q: int | None = None, block_kv: int | None = None,
                               block_q_bwd: int | None = None, block_kv_bwd: int | None = None,
                               block_q_dkv: int | None = None, block_kv_dkv: int | None = None,
                               num_warps: int | None = None, num_stages: int | None = None,
                               num_warps_bwd: int | None = None, num_stages_bwd: int | None = None,
                               interpret: bool = False) -> tuple[jax.Array, None]:
  """Flash attention of query [B, T, N, H] over key/value [B, S, K, H] in Pallas/Triton.

  Same arguments and results as `dot_product_attention` (weights are always None), plus tuning
  knobs (scripts/tune_flash_pallas_gpu.py sweeps them):
    block_q / block_kv: forward tiles, powers of two >= 16 (shrunk to the padded lengths for
      short inputs); block_q_bwd / block_kv_bwd: the dq kernel's tiles;
    block_q_dkv / block_kv_dkv: the dkv kernel's (default: the dq kernel's where those are
      given); each kernel likes a large block of its own rows and a small step over the other
      side, so dq and dkv may want transposed tiles;
    num_warps / num_stages: Triton's, forward; num_warps_bwd / num_stages_bwd: dq and dkv.
  None takes `Tiles.get_default(head_dim, itemsize)` (flash_pallas_gpu_tiles.py): the H100
  sweep's best up to head_dim 128, smaller tiles for wider heads, each shrunk to fit the GPU's
  shared memory per block. Tiles that cannot fit raise ValueError naming the kernel and the
  limit (not in interpret mode). `interpret` runs the kernels in the Pallas interpreter (any
  backend, for tests). Features outside PALLAS_GPU_FLASH_FEATURES raise ValueError naming them.
  """
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  if head_dim < 16 or head_dim & (head_dim - 1) or value.shape[-1] != head_dim:
    raise ValueError(f"pallas_gpu_flash_attention needs one power-of-two head dim >= 16 for q, k "
                     f"and v, got {head_dim} / {value.shape[-1]}")
  tiles = call_tiles(head_dim, jnp.dtype(query.dtype).itemsize, q_len, kv_len, interpret,
                     block_q=block_q, block_kv=block_kv, block_q_bwd=block_q_bwd,
                     block_kv_bwd=block_kv_bwd, block_q_dkv=block_q_dkv,
                     block_kv_dkv=block_kv_dkv, num_warps=num_warps, num_stages=num_stages,
                     num_warps_bwd=num_warps_bwd, num_stages_bwd=num_stages_bwd)
  # Powers of two: the padded lengths are multiples of every tile.
  t_pad = _round_up(q_len, max(tiles.block_q, tiles.block_q_bwd, tiles.block_q_dkv))
  s_pad = _round_up(kv_len, max(tiles.block_kv, tiles.block_kv_bwd, tiles.block_kv_dkv))
  st = _Static(spec=call.options.mask, scale=float(call.options.scale), soft_cap=call.options.soft_cap or None,
               kv_heads=kv_heads, group=num_heads // kv_heads, kv_len=kv_len,
               has_segments=call.q_segment_ids is not None, has_sinks=call.sinks is not None,
               fast_tanh=not interpret and jnp.dtype(query.dtype).itemsize < 4,
               interpret=interpret, **dataclasses.asdict(tiles))

  q_pos = jnp.broadcast_to(call.q_positions.astype(jnp.int32), (batch, q_len))  # [B, T]
  kv_pos = jnp.broadcast_to(call.kv_positions.astype(jnp.int32), (batch, kv_len))  # [B, S]
  # Padding queries continue the token index; padding keys are empty slots.
  q_pos = jnp.concatenate(
      [q_pos, jnp.broadcast_to(jnp.arange(q_len, t_pad, dtype=jnp.int32), (batch, t_pad - q_len))],
      axis=1)  # [B, T']
  kv_pos = _pad_to(kv_pos, s_pad, 1, -1)  # [B, S']
  # The kernels multiply zeroed p / dLogits into V, dO, K and Q (0 * NaN = NaN): what no real
  # pair uses (padding, empty slots; padding is zeros) is selected away where a product needs it.
  q_seg = kv_seg = ranges = live_q = live_k = None
  if st.has_segments:
    q_seg = _pad_to(call.q_segment_ids.astype(jnp.int32), t_pad, 1, 0)  # [B, T']
    kv_seg = _pad_to(call.kv_segment_ids.astype(jnp.int32), s_pad, 1, 0)  # [B, S']
    # Token-level segment ranges, once for forward and backward (O(S log S)).
    same = call.q_segment_ids is call.kv_segment_ids and t_pad == s_pad
    ranges = fb.segment_ranges(q_seg, kv_seg, same=same)
    live_q = rows_with_keys(call.options.mask, q_pos[:, :q_len], kv_pos[:, :kv_len],
                            call.q_segment_ids, call.kv_segment_ids)  # [B, T]
    live_k = keys_with_rows(call.q_segment_ids, call.kv_segment_ids)  # [B, S]
  if not call.options.mask.is_causal:  # only the full mask takes position -1 (an empty slot)
    live_k = kv_pos[:, :kv_len] >= 0 if live_k is None else live_k & (kv_pos[:, :kv_len] >= 0)
  live_q, live_k = (None if live is None else _pad_to(live, n, 1, False)[:, :, None, None]
                    for live, n in ((live_q, t_pad), (live_k, s_pad)))  # [B, T' | S', 1, 1]
  q = _pad_to(query, t_pad, 1, 0)  # [B, T', N, H]
  k, v = (_pad_to(x, s_pad, 1, 0) for x in (key, value))  # [B, S', K, H]
  context = _flash(st, q, k, v, call.sinks, q_pos, kv_pos, q_seg, kv_seg, ranges, live_q,
                   live_k)  # [B, T', N, H]
  return context[:, :q_len], None
