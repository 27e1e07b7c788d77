"""Int8 KV decode on Hopper, written for Mosaic GPU (Pallas `plgpu`).

It has `ragged_decode_reference`'s contract for int8 caches: row lengths,
split-K, attention sinks. Its registry row (at the end) ranks it above the
Triton int8 kernel for int8 caches within its scope on the devices where it
was measured faster (`MEASURED_FASTER_ON`). Its benchmark is
scripts/bench_int8_mgpu.py, which checks it against the reference first.

On the H200 (docs/benchmarks.md, "2026-11-30, second entry"), against the
bfloat16 Triton kernel in the same run, with `auto_splits`: 1.60-1.74x at
full and uniformly ragged lengths (b64 kv4096 / kv8192, b8 kv32768, b64 at
[1, 8192] / [1, 4096]), 0.96x with one row in 8 at 4096 and the rest at 256
(a latency-bound batch); the Triton int8 kernel: 1.07-1.17x and 0.94x. The
TMA stream alone (an ablation) runs 1.82x at b64 kv4096.

How it differs from the Triton kernel:

- Logits are computed transposed, S^T = K q^T [bk, 32], on int8 tensor cores
  straight from the TMA-loaded K tile (wgmma wants both int8 operands
  K-contiguous, which K [bk, H] and the query terms [32, H] are). The query
  is split per row into two int8 terms, q ~= s (hi + mid / 254), which
  keeps about 16 bits of each row against its largest entry (see
  `split_query`); the terms sit side by side in N, so the dot is exact
  integer arithmetic.
- The softmax runs on [bk, 16] (keys x padded query heads): 8 values per
  thread per 64 keys, where the Triton kernel pads the 4 heads to a 16-row dot.
  Its sums over keys cross warps: the sum is kept per thread and reduced
  once after the loop, the running max is reduced in bfloat16 (two values
  per shuffle); the key mask runs on a row's last tile only.
- p.v runs transposed, acc^T += V^T p^T [H, 16], with V^T read by the tensor
  cores from shared memory as bfloat16 (16-bit operands may be MN-major;
  int8 ones may not), accumulating into acc; it is left running behind
  the next tile's q.k.
- Two warpgroups: the compute one, and one that issues the TMA copies and
  converts each V tile to bfloat16 a tile ahead (two V buffers), so the
  compute chain does neither. A V slot is refilled as soon as it is
  converted, K's once the compute warpgroup has read it.
- No split-K once the grid fills a wave: rows launch longest first
  (`launch_order`), which balances ragged batches without the partials and
  their merge.

Budget: 83 registers per thread (ptxas) and about 80 KB of shared memory
at the default tiling (bk 64, 2 stages), so two programs share an SM; with
V's early refill 2 stages beat 3 in 17 of 18 shape-runs, and more stages or
a third V buffer cost the second program (docs/benchmarks.md).

Scope: int8 K and V with per-token-per-head float32 scales, a 16-bit query,
at most 16 query heads per kv head, head_dim 128 or 256 (the int8 tiles are
128-byte swizzled rows; 384 and up exceed shared memory), a cache length
that is a multiple of the tile; no soft cap or window.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from meshattn.layers.kernels.decode import decode_splits
from meshattn.layers.kernels.decode.decode_splits import launch_order
from meshattn.layers.kernels.api import decode_kernel
from meshattn.layers.kernels.registry import GPU, HALF_DTYPES, Limits, Request, decode_variant
from meshattn.layers.kernels.shared.lazy_import import lazy_module

# Imported when a kernel is built (registry discovery imports this module on every host).
plgpu = lazy_module("jax.experimental.pallas.mosaic_gpu")

# Query heads per kv head are padded to this many columns (wgmma N, and 32
# bytes of bfloat16 p^T per key so the p tile can be swizzled).
PADDED_GROUP = 16
# The two int8 terms of the query: q ~= s * (hi + mid / R).
Q_TERMS = 2
Q_RADIX = 254.0
LOG2E = math.log2(math.e)
# Default tiling: 64-key tiles, 2 stages (two programs per SM; see Budget).
BLOCK_KV = 64
STAGES = 2
# Ablations for scripts/bench_int8_mgpu.py; both give wrong results on purpose.
ABLATIONS = (None, "tma_only", "no_v_conversion")


def split_query(query: jax.Array) -> tuple[jax.Array, jax.Array]:
  """query [B, K, G, H] float -> (terms [B, K, 2 * 16, H] int8, row scale [B, K, 16] f32).

  Each row y = q / s with s = max|q| / 127 is written as hi + mid / 254
  with |hi|, |mid| <= 127: the error is at most s / (2 * 254), 1.6e-5 of
  the row's largest entry. That is finer than the bfloat16 query's own
  rounding for every entry above 1% of the row's largest, and 250 times
  finer than the int8 keys it meets (each key is rounded to 1/254 of its
  largest entry). A third term (error 6e-8) cost 1.2-1.9% of the kernel's
  speed at b64 (none at b8 kv32768) and changed no measured error. Padding rows (and all-zero rows)
  get zero terms; padding rows get scale 0.
  """
  g = query.shape[2]
  q = query.astype(jnp.float32)
  amax = jnp.max(jnp.abs(q), axis=-1, keepdims=True)  # [B, K, G, 1]
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  y = q / scale  # [B, K, G, H] in [-127, 127]
  hi = jnp.round(y)
  mid = jnp.round((y - hi) * Q_RADIX)  # |mid| <= 127
  pad = ((0, 0), (0, 0), (0, PADDED_GROUP - g), (0, 0))
  terms = [jnp.pad(t.astype(jnp.int8), pad) for t in (hi, mid)]
  row_scale = jnp.pad(scale[..., 0], pad[:3])  # [B, K, 16]
  return jnp.concatenate(terms, axis=2), row_scale  # [B, K, 32, H]


def _kernel(len_ref, order_ref, qt_ref, cs_ref, k_ref, v_ref, ks_ref, vs_ref, acc_ref_out,
            ml_ref_out, scoped, *, block_kv: int, blocks_per_split: int, stages: int, head_dim: int,
            ablation: str | None):
  smem, barriers = scoped
  qt_smem, cs_smem, k_smem, v_smem, ks_smem, vs_smem, vb_smem, p_smem, o_smem, ml_smem = smem
  q_bar, k_bar, v_bar, ks_bar, vs_bar, k_free, vb_ready, vb_free = barriers
  # Rows launch longest first (order_ref, see `launch_order`).
  b = order_ref[lax.axis_index("batch")]
  h = lax.axis_index("heads")
  split = lax.axis_index("split")
  length = len_ref[b]
  first = split * blocks_per_split  # this program's blocks: [first, first + steps)
  steps = jnp.clip(pl.cdiv(length, block_kv) - first, 0, blocks_per_split)
  n = PADDED_GROUP
  row = plgpu.Layout.WGMMA.reduce(1)  # a [bk] vector along the key rows
  col = plgpu.Layout.WGMMA.reduce(0)  # a [16] vector along the query columns

  @pl.when(lax.axis_index("wg") == 0)
  def _compute():
    plgpu.copy_gmem_to_smem(qt_ref.at[b, h], qt_smem, q_bar.at[0])
    plgpu.copy_gmem_to_smem(cs_ref.at[b, h], cs_smem, q_bar.at[1])
    plgpu.barrier_wait(q_bar.at[0])
    plgpu.barrier_wait(q_bar.at[1])
    # [16]: s_q * softmax scale * log2(e). The copy is padded to 32 entries:
    # a TMA copy must move a multiple of 128 bytes here.
    col_scale = plgpu.load(cs_smem.at[pl.ds(0, n)], (), layout=col)

    def body(step, carry, acc_ref, *, masked: bool):
      m, l_part = carry  # [16], [bk, 16] (l before its sum over keys)
      slot = lax.rem(step, stages)
      if ablation == "tma_only":
        for bar in (k_bar, ks_bar, vs_bar):
          plgpu.barrier_wait(bar.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        plgpu.barrier_wait(vb_ready.at[lax.rem(step, 2)])
        pl.when(step > 0)(lambda: plgpu.barrier_arrive(vb_free.at[lax.rem(step + 1, 2)]))
        return carry

      plgpu.barrier_wait(k_bar.at[slot])

      def qk(acc_ref):
        # [bk, H] int8 x [H, 32] int8 -> [bk, 32] int32, exact.
        plgpu.wgmma(acc_ref, k_smem.at[slot], qt_smem.transpose((1, 0)))
        return acc_ref[...]

      # Reading the logits waits for every tensor-core op, so the previous
      # tile's p.v (left running, see below) is done: its V buffer goes back
      # to the converting warpgroup, and p_smem may be rewritten.
      s_int = pl.run_scoped(qk, plgpu.ACC((block_kv, Q_TERMS * n), jnp.int32))
      pl.when(step > 0)(lambda: plgpu.barrier_arrive(vb_free.at[lax.rem(step + 1, 2)]))
      plgpu.barrier_wait(ks_bar.at[slot])
      plgpu.barrier_wait(vs_bar.at[slot])
      k_scale = plgpu.load(ks_smem.at[slot], (), layout=row)  # [bk]
      v_scale = plgpu.load(vs_smem.at[slot], (), layout=row)  # [bk]
      plgpu.barrier_arrive(k_free.at[slot])

      hi = s_int[:, 0:n].astype(jnp.float32)  # [bk, 16]
      mid = s_int[:, n:2 * n].astype(jnp.float32)
      dots = hi + mid * (1.0 / Q_RADIX)  # [bk, 16]
      logits = (dots * lax.broadcast_in_dim(k_scale, dots.shape, [0])
                * lax.broadcast_in_dim(col_scale, dots.shape, [1]))  # [bk, 16], log2 units
      if masked:
        # Keys past the row's end. Every processed tile has a valid key, so
        # m_new stays finite.
        key_index = plgpu.broadcasted_iota(jnp.int32, (block_kv, n), 0,
                                           layout=plgpu.Layout.WGMMA)
        valid = key_index + (first + step) * block_kv < length  # [bk, 16]
        logits = jnp.where(valid, logits, -jnp.inf)
      # The max over keys crosses warps; taken in bfloat16 it moves two
      # values per shuffle and per shared-memory slot (3-6% faster, H200).
      # m is only the reference the exponents are taken against: any value
      # used consistently for p, l and alpha gives the same softmax, and
      # rounding it (2^-9 relative) leaves p <= 2^(|m| / 512): at most 2^64
      # for logits below 2^15 in magnitude (log2 units), far inside float32.
      tile_max = logits.astype(jnp.bfloat16).max(axis=0).astype(jnp.float32)  # [16]
      m_new = jnp.maximum(m, tile_max)
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(logits - lax.broadcast_in_dim(m_new, logits.shape, [1]))  # [bk, 16]
      # The sum over keys crosses warps; it is done once, after the loop.
      l_part = l_part * lax.broadcast_in_dim(alpha, p.shape, [1]) + p
      pv_weights = p * lax.broadcast_in_dim(v_scale, p.shape, [0])
      if masked:
        # Selected, not multiplied: scales past the row's end may be anything.
        pv_weights = jnp.where(valid, pv_weights, 0.0)
      p_smem[...] = pv_weights.astype(jnp.bfloat16)
      plgpu.commit_smem()

      vslot = lax.rem(step, 2)
      plgpu.barrier_wait(vb_ready.at[vslot])

      # acc^T = acc^T * alpha + [H, bk] bf16 (V^T, read transposed) x [bk, 16]
      # bf16. The product is not waited for here: the next tile's q.k runs
      # behind it, and reading those logits waits for both.
      acc_ref[...] = acc_ref[...] * lax.broadcast_in_dim(alpha, acc_ref.shape, [1])
      plgpu.wgmma(acc_ref, vb_smem.at[vslot].transpose((1, 0)), p_smem)
      return m_new, l_part

    m = plgpu.layout_cast(jnp.full((n,), -jnp.inf, jnp.float32), col)
    l_part = plgpu.layout_cast(jnp.zeros((block_kv, n), jnp.float32), plgpu.Layout.WGMMA)
    # Only the last tile can run past the row's end: the others skip the mask.
    last = jnp.maximum(steps - 1, 0)

    def tiles(acc_ref):  # acc_ref: [H, 16] f32 accumulator, zeroed
      carry = lax.fori_loop(0, last, functools.partial(body, acc_ref=acc_ref, masked=False),
                            (m, l_part))
      carry = lax.fori_loop(last, steps, functools.partial(body, acc_ref=acc_ref, masked=True),
                            carry)
      return acc_ref[...], *carry

    acc, m, l_part = pl.run_scoped(tiles, plgpu.ACC((head_dim, n), jnp.float32))
    l = l_part.sum(axis=0)  # [16]
    # Unnormalised partials for combine_splits: acc^T [H, 16], m (natural log
    # units) and l.
    o_smem[...] = acc
    ml_smem[0] = m * (1.0 / LOG2E)
    ml_smem[1] = l
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, acc_ref_out.at[b, h, split])
    plgpu.copy_smem_to_gmem(ml_smem, ml_ref_out.at[b, h, split])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(lax.axis_index("wg") == 1)
  def _memory():
    def issue_v(step, slot):
      keys = pl.ds((first + step) * block_kv, block_kv)
      plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], v_smem.at[slot], v_bar.at[slot])

    def issue_rest(step, slot):
      keys = pl.ds((first + step) * block_kv, block_kv)
      plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(ks_ref.at[b, h, keys], ks_smem.at[slot], ks_bar.at[slot])
      plgpu.copy_gmem_to_smem(vs_ref.at[b, h, keys], vs_smem.at[slot], vs_bar.at[slot])

    for i in range(stages):
      @pl.when(i < steps)
      def _prologue(i=i):
        issue_rest(i, i)
        issue_v(i, i)

    # This warpgroup also converts V to bfloat16, a tile ahead of the compute
    # warpgroup (two V buffers), so the conversion is off the compute chain.
    @pl.loop(0, steps)
    def _(j):
      slot = lax.rem(j, stages)
      vslot = lax.rem(j, 2)
      plgpu.barrier_wait(v_bar.at[slot])
      pl.when(j >= 2)(lambda: plgpu.barrier_wait(vb_free.at[vslot]))
      if ablation is None:
        v = plgpu.load(v_smem.at[slot], (), layout=plgpu.Layout.WGMMA_8BIT)  # [bk, H] int8
        vb_smem.at[vslot][...] = v.astype(jnp.bfloat16)  # exact
        plgpu.commit_smem()
      plgpu.barrier_arrive(vb_ready.at[vslot])
      # The slot's V is converted: its refill goes out now, a tile before K's.
      pl.when(j + stages < steps)(lambda: issue_v(j + stages, slot))

      # K and the scales are free once the compute warpgroup has read them.
      @pl.when(j + stages < steps)
      def _refill():
        plgpu.barrier_wait(k_free.at[slot])
        issue_rest(j + stages, slot)


def _tiled(shape, dtype, swizzle: int):
  bits = jnp.dtype(dtype).itemsize * 8
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)))


# Programs resident per SM at the default tiling (see Budget).
RESIDENT_PER_SM = 2


def auto_splits(programs: int, max_blocks: int, cores: int | None = None) -> int:
  """Splits of a longest row: enough to fill one wave of resident programs (at least 2 below
  a wave); 1 once the grid fills a wave.

  The row lengths are not known here; `launch_order` balances ragged rows
  instead. Measured on the H200 (docs/benchmarks.md, 2026-11-30, second
  entry), against the bfloat16 kernel:
  - b8 x 8 heads at kv32768 (64 programs) needs 4 splits to fill the
    wave: 1.72x (unsplit 0.76x, 2 splits 1.41x).
  - b64 x 8 heads (512 programs, about two waves), rows longest first:
    unsplit 1.69x at kv4096 and 1.60x / 1.65x at lengths uniform in
    [1, 4096] / [1, 8192]; 2 splits 1.60x, 1.42x, 1.63x (the merge and
    the shorter programs cost more than they balance). With one row in 8
    full and the others 1/16 of it, unsplit 1.00x, 2 splits 0.94x.
  """
  cores = decode_splits.sm_count() if cores is None else cores
  resident = RESIDENT_PER_SM * cores
  # Below a wave, at least 2: a grid of 133-263 programs (not measured since
  # the longest-first order) would otherwise leave SMs with one program.
  fit = 1 if programs >= resident else max(resident // max(programs, 1), 2)
  return int(max(1, min(fit, max_blocks // decode_splits.MIN_BLOCKS_PER_SPLIT)))


# Devices where this kernel was measured faster than the Triton int8 kernel
# (docs/benchmarks.md, 2026-11-30). It runs on any Hopper GPU (wgmma, TMA),
# but other parts (the H100) keep the Triton kernel until measured.
MEASURED_FASTER_ON = ("NVIDIA H200",)
# head_dim it was measured at; 256 lowers but fits one program per SM, which
# auto_splits does not assume.
MEASURED_HEAD_DIM = 128


@functools.cache
def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.x: wgmma)."""
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


@functools.cache
def measured_faster_here() -> bool:
  """Whether the default device is one where this kernel beat the Triton int8 kernel."""
  return on_hopper() and jax.devices()[0].device_kind in MEASURED_FASTER_ON


def check_arguments(query, key, value, lengths, key_scale, value_scale, sinks, *,
                    block_kv: int, stages: int, ablation: str | None) -> None:
  """Raise ValueError naming the argument unless the kernel serves this request."""
  if key.ndim != 4:
    raise ValueError(f"key must be [B, S, K, H], got shape {key.shape}")
  batch, kv_len, kv_heads, head_dim = key.shape
  if query.ndim != 3 or query.shape[0] != batch or query.shape[2] != head_dim \
      or query.shape[1] % kv_heads:
    raise ValueError(f"query must be [B, N, H] = [{batch}, N, {head_dim}] with N a multiple "
                     f"of the {kv_heads} kv heads, got {query.shape}")
  group = query.shape[1] // kv_heads
  if jnp.dtype(query.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"query must be bfloat16 or float16, got {query.dtype}")
  if key.dtype != jnp.int8 or value.dtype != jnp.int8 or value.shape != key.shape:
    raise ValueError(f"key and value must be int8 of one shape, got {key.dtype} {key.shape}, "
                     f"{value.dtype} {value.shape}")
  if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be integer [B] = [{batch}], got {lengths.dtype} {lengths.shape}")
  want = (batch, kv_heads, kv_len)
  for name, s in (("key_scale", key_scale), ("value_scale", value_scale)):
    if s is None or s.shape != want or s.dtype != jnp.float32:
      got = None if s is None else f"{s.dtype} {s.shape}"
      raise ValueError(f"{name} must be float32 [B, K, S] = {want} (per token and head, "
                       f"head-major as the cache stores it), got {got}")
  if sinks is not None and sinks.shape != (query.shape[1],):
    raise ValueError(f"sinks must be [N] = [{query.shape[1]}], got {sinks.shape}")
  if group > PADDED_GROUP:
    raise ValueError(f"at most {PADDED_GROUP} query heads per kv head, got {group}")
  if head_dim not in (128, 256):
    raise ValueError(f"head_dim must be 128 or 256 (128-byte int8 tiles; from 384 on the tiles "
                     f"exceed shared memory), got {head_dim}")
  if block_kv not in (64, 128):
    raise ValueError(f"block_kv must be 64 or 128, got {block_kv}")
  if stages < 1 or kv_len % block_kv:
    raise ValueError(f"the cache length {kv_len} must be a multiple of block_kv={block_kv}, "
                     f"and stages={stages} >= 1")
  if ablation not in ABLATIONS:
    raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")


def int8_decode_mgpu(query, key, value, lengths, key_scale, value_scale, *, scale: float,
                     sinks=None, num_splits: int | None = None, block_kv: int = BLOCK_KV,
                     stages: int = STAGES, ablation: str | None = None):
  """Decode attention over an int8 cache (Hopper, Mosaic GPU); `ragged_decode_reference`'s contract.

  query [B, N, H] bfloat16/float16 (N = K * G, G <= 16); key, value
  [B, S, K, H] int8 with S a multiple of block_kv; lengths [B]: row b
  attends to keys [0, lengths[b]); key_scale, value_scale [B, K, S] float32
  (per token and head, head-major as the cache stores them: one TMA copy
  per tile); sinks [N] or None. num_splits: splits of a longest row
  (split-K, merged by `decode_splits.combine_splits`); None: `auto_splits`.
  Returns [B, N, H] in query.dtype; a row of length 0 gives zeros (or the
  sink's zero value).
  """
  check_arguments(query, key, value, lengths, key_scale, value_scale, sinks,
                  block_kv=block_kv, stages=stages, ablation=ablation)
  batch, kv_len, kv_heads, head_dim = key.shape
  heads = query.shape[1]
  group = heads // kv_heads
  n = PADDED_GROUP
  max_blocks = kv_len // block_kv
  if num_splits is None:
    num_splits = auto_splits(batch * kv_heads, max_blocks)
  if num_splits < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}")
  blocks_per_split, num_splits = decode_splits.split_layout(
      max_blocks, programs=batch * kv_heads, num_splits=num_splits, blocks_per_split=None,
      interpret=False)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, kv_len)  # [B]
  terms, row_scale = split_query(query.reshape(batch, kv_heads, group, head_dim))
  col_scale = jnp.pad(row_scale * (scale * LOG2E), ((0, 0), (0, 0), (0, n)))  # [B, K, 32]

  kernel = functools.partial(_kernel, block_kv=block_kv, blocks_per_split=blocks_per_split,
                             stages=stages, head_dim=head_dim, ablation=ablation)

  def entry(len_ref, order_ref, qt_ref, cs_ref, k_ref, v_ref, ks_ref, vs_ref, acc_out, ml_out):
    smem = (
        _tiled((Q_TERMS * n, head_dim), jnp.int8, 128),  # qt_smem
        plgpu.SMEM((2 * n,), jnp.float32),  # cs_smem
        _tiled((stages, block_kv, head_dim), jnp.int8, 128),  # k_smem
        _tiled((stages, block_kv, head_dim), jnp.int8, 128),  # v_smem
        plgpu.SMEM((stages, block_kv), jnp.float32),  # ks_smem
        plgpu.SMEM((stages, block_kv), jnp.float32),  # vs_smem
        _tiled((2, block_kv, head_dim), jnp.bfloat16, 32),  # vb_smem: V as bfloat16
        _tiled((block_kv, n), jnp.bfloat16, 32),  # p_smem: p * v_scale
        _tiled((head_dim, n), jnp.float32, 64),  # o_smem: acc^T
        plgpu.SMEM((2, n), jnp.float32),  # ml_smem: m, l
    )
    barriers = (
        plgpu.Barrier(num_barriers=2),  # q_bar
        *(plgpu.Barrier(num_barriers=stages) for _ in range(4)),  # k, v, ks, vs arrived
        plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # k_free
        plgpu.Barrier(num_arrivals=1, num_barriers=2),  # vb_ready
        plgpu.Barrier(num_arrivals=1, num_barriers=2),  # vb_free
    )
    pl.run_scoped(
        lambda *args: kernel(len_ref, order_ref, qt_ref, cs_ref, k_ref, v_ref, ks_ref, vs_ref,
                             acc_out, ml_out, (args[:len(smem)], args[len(smem):])),
        *smem, *barriers, collective_axes="wg")

  acc, ml = plgpu.kernel(
      entry,
      out_type=(jax.ShapeDtypeStruct((batch, kv_heads, num_splits, head_dim, n), jnp.float32),
                jax.ShapeDtypeStruct((batch, kv_heads, num_splits, 2, n), jnp.float32)),
      # The last grid axis varies fastest in launch order: every head of a
      # row, then the next row (longest first), then the next split.
      grid=(num_splits, batch, kv_heads),
      grid_names=("split", "batch", "heads"),
      num_threads=2,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True,
          # Safe here: threads only write vb/p/o/ml_smem, which only wgmma and
          # TMA read, after commit_smem; TMA-written buffers are only read.
          unsafe_no_auto_barriers=True,
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(lengths, launch_order(lengths), terms, col_scale, key, value, key_scale, value_scale)
  # The merge runs in the kernel's transposed layout: acc^T [B, K, P, H, G],
  # m and l [B, K, P, 1, G]; only the merged [B, K, H, G] is transposed.
  acc = acc[..., :group]  # [B, K, P, H, G]
  m = ml[:, :, :, 0:1, :group]  # [B, K, P, 1, G]
  l = ml[:, :, :, 1:2, :group]
  nonempty = decode_splits.split_nonempty(jnp.zeros_like(lengths), pl.cdiv(lengths, block_kv),
                                          num_splits, blocks_per_split)  # [B, P]
  sink = None if sinks is None else sinks.astype(jnp.float32).reshape(kv_heads, 1, group)
  out = decode_splits.combine_splits(m, l, acc, nonempty, sink, query.dtype)  # [B, K, H, G]
  return jnp.swapaxes(out, 2, 3).reshape(batch, heads, head_dim)


# What the registry may hand it: an int8 contiguous cache; no soft cap or window.
INT8_MGPU_FEATURES = frozenset({"gqa", "causal", "sinks", "quantized_kv"})


def _fits(request: Request) -> str | None:
  if request.kv_dtype != "int8" or request.kv_quant_axis != "dkv":
    return "needs an int8 cache with per-head scales (kv_quant_axis dkv)"
  if request.group is not None and request.group > PADDED_GROUP:
    return f"{request.group} query heads per kv head (at most {PADDED_GROUP})"
  if request.kv_len is not None and request.kv_len % BLOCK_KV:
    return f"cache length {request.kv_len} not a multiple of {BLOCK_KV}"
  return None


# Rank 2, above the Triton kernel (1), where measured faster (the module doc); other Hopper
# parts keep Triton until measured (`measured_faster_here`, looked up when asked).
@decode_variant("ragged", GPU, INT8_MGPU_FEATURES, "Mosaic GPU int8 (H200)",
                available=lambda: measured_faster_here(), requires=frozenset({"quantized_kv"}),
                rank=2,
                limits=Limits(GPU, min_head_dim=128, max_head_dim=128, dtypes=HALF_DTYPES,
                              fits=_fits, why="measured at head_dim 128, 64-token tiles"))
@decode_kernel("contiguous")
def ragged_int8_decode(query, key, value, lengths, *, scale: float, soft_cap=None, window=None,
                       sinks=None, key_scale=None, value_scale=None):
  """The decode protocol's entry (kernels/api.py: a contiguous cache's view): what the
  registry hands this kernel is in its scope (its registration above), which has no soft cap
  and no window."""
  if soft_cap is not None or window is not None:
    raise ValueError("the Mosaic GPU int8 decode kernel takes no soft cap or window")
  return int8_decode_mgpu(query, key, value, lengths, key_scale, value_scale, scale=scale,
                          sinks=sinks)
