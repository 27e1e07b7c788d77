"""Experimental: int8 KV decode on Hopper, written for Mosaic GPU (Pallas `plgpu`).

Not routed by the registry. The int8 KV decode target of issue 5 (1.6x the
bfloat16 kernel) is not met by the landed Triton kernel, which is bound by
issuing instructions (docs/benchmarks.md, 2026-11-29). This kernel is the
next attempt, kept with its benchmark (scripts/bench_int8_mgpu.py) so the
next step starts from a working, checked kernel. On the H200 it runs 1.29-1.35x
the bfloat16 kernel against the Triton int8 kernel's 1.14-1.15x (uniform
lengths, b64 kv4096 / kv8192); docs/benchmarks.md ("2026-11-29, second
session") has the table, the ablations and what is left.

How it differs from the Triton kernel:

- Logits are computed transposed, S^T = K q^T [bk, 48], on int8 tensor cores
  straight from the TMA-loaded K tile (wgmma wants both int8 operands
  K-contiguous, which K [bk, H] and the query terms [48, H] are). The query
  is split per row into three int8 terms, q ~= s (hi + mid / 254 + lo / 254^2),
  which keeps about 24 bits of each row against its largest entry; the
  three terms sit side by side in N, so the dot is exact integer arithmetic.
- The softmax runs on [bk, 16] (keys x padded query heads): 8 values per
  thread per 64 keys, where the Triton kernel pads the 4 heads to a 16-row dot.
- V is converted to bfloat16 once per tile and p.v runs transposed,
  acc^T = V^T p^T [H, 16], with V^T read by the tensor cores from shared
  memory (16-bit operands may be MN-major; int8 ones may not).
- One warpgroup only issues TMA copies, the other computes (warp
  specialisation), so the loads of later tiles overlap the chain.

Scope: full-length rows (no lengths, splits, soft cap, sinks or window),
int8 K and V with per-token-per-head float32 scales stored head-major
[B, K, S], a 16-bit query, at most 16 query heads per kv head.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# Query heads per kv head are padded to this many columns (wgmma N, and 32
# bytes of bfloat16 p^T per key so the p tile can be swizzled).
PADDED_GROUP = 16
# The three int8 terms of the query: q ~= s * (hi + mid / R + lo / R^2).
Q_TERMS = 3
Q_RADIX = 254.0
LOG2E = math.log2(math.e)
# Ablations for scripts/bench_int8_mgpu.py; both give wrong results on purpose.
ABLATIONS = (None, "tma_only", "no_v_conversion")


def split_query(query: jax.Array) -> tuple[jax.Array, jax.Array]:
  """query [B, K, G, H] float -> (terms [B, K, 3 * 16, H] int8, row scale [B, K, 16] f32).

  Each row y = q / s with s = max|q| / 127 is written as hi + mid / 254 +
  lo / 254^2 with |hi|, |mid|, |lo| <= 127: the error is at most
  s / (2 * 254^2), about 6e-8 of the row's largest entry. Padding rows (and
  all-zero rows) get zero terms; padding rows get scale 0.
  """
  g = query.shape[2]
  q = query.astype(jnp.float32)
  amax = jnp.max(jnp.abs(q), axis=-1, keepdims=True)  # [B, K, G, 1]
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  y = q / scale  # [B, K, G, H] in [-127, 127]
  hi = jnp.round(y)
  r = (y - hi) * Q_RADIX  # |r| <= 127
  mid = jnp.round(r)
  lo = jnp.round((r - mid) * Q_RADIX)
  pad = ((0, 0), (0, 0), (0, PADDED_GROUP - g), (0, 0))
  terms = [jnp.pad(t.astype(jnp.int8), pad) for t in (hi, mid, lo)]
  row_scale = jnp.pad(scale[..., 0], pad[:3])  # [B, K, 16]
  return jnp.concatenate(terms, axis=2), row_scale  # [B, K, 48, H]


def _kernel(qt_ref, cs_ref, k_ref, v_ref, ks_ref, vs_ref, out_ref, scoped, *,
            block_kv: int, steps: int, stages: int, head_dim: int, ablation: str | None):
  smem, barriers = scoped
  qt_smem, cs_smem, k_smem, v_smem, ks_smem, vs_smem, vb_smem, p_smem, o_smem = smem
  q_bar, k_bar, v_bar, ks_bar, vs_bar, k_free, v_free = barriers
  b = lax.axis_index("batch")
  h = lax.axis_index("heads")
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

    def body(step, carry):
      acc, m, l = carry  # [H, 16] f32, [16], [16]
      slot = lax.rem(step, stages)
      if ablation == "tma_only":
        for bar in (k_bar, ks_bar, v_bar, vs_bar):
          plgpu.barrier_wait(bar.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m, l

      plgpu.barrier_wait(k_bar.at[slot])

      def qk_and_convert_v(acc_ref):
        # [bk, H] int8 x [H, 48] int8 -> [bk, 48] int32, exact; asynchronous.
        plgpu.wgmma(acc_ref, k_smem.at[slot], qt_smem.transpose((1, 0)))
        # While the tensor cores run: V [bk, H] int8 -> bfloat16 (exact).
        # The 8-bit layout loads 4 bytes per instruction.
        plgpu.barrier_wait(v_bar.at[slot])
        if ablation != "no_v_conversion":
          v = plgpu.load(v_smem.at[slot], (), layout=plgpu.Layout.WGMMA_8BIT)
          vb_smem[...] = v.astype(jnp.bfloat16)
        return acc_ref[...]

      s_int = pl.run_scoped(qk_and_convert_v, plgpu.ACC((block_kv, Q_TERMS * n), jnp.int32))
      plgpu.barrier_wait(ks_bar.at[slot])
      plgpu.barrier_wait(vs_bar.at[slot])
      k_scale = plgpu.load(ks_smem.at[slot], (), layout=row)  # [bk]
      v_scale = plgpu.load(vs_smem.at[slot], (), layout=row)  # [bk]
      plgpu.barrier_arrive(k_free.at[slot])
      plgpu.barrier_arrive(v_free.at[slot])

      hi = s_int[:, 0:n].astype(jnp.float32)  # [bk, 16]
      mid = s_int[:, n:2 * n].astype(jnp.float32)
      lo = s_int[:, 2 * n:3 * n].astype(jnp.float32)
      dots = hi + (mid + lo * (1.0 / Q_RADIX)) * (1.0 / Q_RADIX)  # [bk, 16]
      logits = (dots * lax.broadcast_in_dim(k_scale, dots.shape, [0])
                * lax.broadcast_in_dim(col_scale, dots.shape, [1]))  # [bk, 16], log2 units
      m_new = jnp.maximum(m, logits.max(axis=0))  # [16]
      alpha = jnp.exp2(m - m_new)
      p = jnp.exp2(logits - lax.broadcast_in_dim(m_new, logits.shape, [1]))  # [bk, 16]
      l = l * alpha + p.sum(axis=0)
      p_smem[...] = (p * lax.broadcast_in_dim(v_scale, p.shape, [0])).astype(jnp.bfloat16)
      plgpu.commit_smem()

      def pv(acc_ref):
        # [H, bk] bf16 (V^T, read transposed) x [bk, 16] bf16 -> [H, 16] f32.
        plgpu.wgmma(acc_ref, vb_smem.transpose((1, 0)), p_smem)
        return acc_ref[...]

      tile_acc = pl.run_scoped(pv, plgpu.ACC((head_dim, n), jnp.float32))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1]) + tile_acc
      return acc, m_new, l

    acc = plgpu.layout_cast(jnp.zeros((head_dim, n), jnp.float32), plgpu.Layout.WGMMA)
    m = plgpu.layout_cast(jnp.full((n,), -jnp.inf, jnp.float32), col)
    l = plgpu.layout_cast(jnp.full((n,), 1.0 if ablation == "tma_only" else 0.0,
                                   jnp.float32), col)
    acc, m, l = lax.fori_loop(0, steps, body, (acc, m, l))
    o_smem[...] = acc / lax.broadcast_in_dim(l, acc.shape, [1])  # [H, 16]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, h])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(lax.axis_index("wg") == 1)
  def _memory():
    def issue(step, slot):
      keys = pl.ds(step * block_kv, block_kv)
      plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], k_smem.at[slot], k_bar.at[slot])
      plgpu.copy_gmem_to_smem(ks_ref.at[b, h, keys], ks_smem.at[slot], ks_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], v_smem.at[slot], v_bar.at[slot])
      plgpu.copy_gmem_to_smem(vs_ref.at[b, h, keys], vs_smem.at[slot], vs_bar.at[slot])

    for i in range(stages):
      issue(i, i)

    @pl.loop(0, steps - stages)
    def _(i):
      slot = lax.rem(i, stages)
      # A slot's K and V are released together, after its scales are read.
      plgpu.barrier_wait(k_free.at[slot])
      plgpu.barrier_wait(v_free.at[slot])
      issue(i + stages, slot)


def _tiled(shape, dtype, swizzle: int):
  bits = jnp.dtype(dtype).itemsize * 8
  return plgpu.SMEM(shape, dtype, transforms=(
      plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle)))


def int8_decode_mgpu(query, key, value, key_scale, value_scale, *, scale: float,
                     block_kv: int = 64, stages: int = 3, ablation: str | None = None):
  """Decode attention over full-length int8 K/V (Hopper, Mosaic GPU).

  query [B, K, G, H] bfloat16/float16 with G <= 16; key, value [B, S, K, H]
  int8; key_scale, value_scale [B, K, S] float32 (head-major: one TMA copy
  per tile). S a multiple of block_kv, with at least `stages` blocks.
  Returns [B, K, G, H] float32.
  """
  batch, kv_len, kv_heads, head_dim = key.shape
  group = query.shape[2]
  if query.shape != (batch, kv_heads, group, head_dim):
    raise ValueError(f"query must be [B, K, G, H] = [{batch}, {kv_heads}, G, {head_dim}], "
                     f"got {query.shape}")
  if jnp.dtype(query.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"query must be bfloat16 or float16, got {query.dtype}")
  if key.dtype != jnp.int8 or value.dtype != jnp.int8 or value.shape != key.shape:
    raise ValueError(f"key and value must be int8 of one shape, got {key.dtype} {key.shape}, "
                     f"{value.dtype} {value.shape}")
  for name, s in (("key_scale", key_scale), ("value_scale", value_scale)):
    if s.shape != (batch, kv_heads, kv_len) or s.dtype != jnp.float32:
      raise ValueError(f"{name} must be float32 [B, K, S] = {(batch, kv_heads, kv_len)}, "
                       f"got {s.dtype} {s.shape}")
  if group > PADDED_GROUP:
    raise ValueError(f"at most {PADDED_GROUP} query heads per kv head, got {group}")
  if head_dim % 64:
    raise ValueError(f"head_dim must be a multiple of 64, got {head_dim}")
  if block_kv not in (64, 128):
    raise ValueError(f"block_kv must be 64 or 128, got {block_kv}")
  if stages < 1 or kv_len % block_kv or kv_len // block_kv < stages:
    raise ValueError(f"kv length {kv_len} must be a multiple of block_kv={block_kv} "
                     f"with at least stages={stages} >= 1 blocks")
  if ablation not in ABLATIONS:
    raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}")
  n = PADDED_GROUP
  terms, row_scale = split_query(query)  # [B, K, 48, H], [B, K, 16]
  col_scale = jnp.pad(row_scale * (scale * LOG2E), ((0, 0), (0, 0), (0, n)))  # [B, K, 32]

  kernel = functools.partial(_kernel, block_kv=block_kv, steps=kv_len // block_kv,
                             stages=stages, head_dim=head_dim, ablation=ablation)

  def entry(qt_ref, cs_ref, k_ref, v_ref, ks_ref, vs_ref, out_ref):
    smem = (
        _tiled((Q_TERMS * n, head_dim), jnp.int8, 128),  # qt_smem
        plgpu.SMEM((2 * n,), jnp.float32),  # cs_smem
        _tiled((stages, block_kv, head_dim), jnp.int8, 128),  # k_smem
        _tiled((stages, block_kv, head_dim), jnp.int8, 128),  # v_smem
        plgpu.SMEM((stages, block_kv), jnp.float32),  # ks_smem
        plgpu.SMEM((stages, block_kv), jnp.float32),  # vs_smem
        _tiled((block_kv, head_dim), jnp.bfloat16, 32),  # vb_smem: V as bfloat16
        _tiled((block_kv, n), jnp.bfloat16, 32),  # p_smem: p * v_scale
        _tiled((head_dim, n), jnp.float32, 64),  # o_smem
    )
    barriers = (
        plgpu.Barrier(num_barriers=2),  # q_bar
        *(plgpu.Barrier(num_barriers=stages) for _ in range(4)),  # k, v, ks, vs arrived
        *(plgpu.Barrier(num_arrivals=1, num_barriers=stages) for _ in range(2)),  # k, v free
    )
    pl.run_scoped(
        lambda *args: kernel(qt_ref, cs_ref, k_ref, v_ref, ks_ref, vs_ref, out_ref,
                             (args[:len(smem)], args[len(smem):])),
        *smem, *barriers, collective_axes="wg")

  out = plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((batch, kv_heads, head_dim, n), jnp.float32),
      grid=(kv_heads, batch),
      grid_names=("heads", "batch"),
      num_threads=2,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(
          approx_math=True,
          # Safe here: threads only write vb/p/o_smem, which only wgmma and
          # TMA read, after commit_smem; TMA-written buffers are only read.
          unsafe_no_auto_barriers=True,
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )(terms, col_scale, key, value, key_scale, value_scale)  # [B, K, H, 16]
  return jnp.swapaxes(out, 2, 3)[:, :, :group]  # [B, K, G, H]
