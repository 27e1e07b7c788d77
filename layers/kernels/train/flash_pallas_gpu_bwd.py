"""The backward kernels of the Pallas GPU flash kernel (flash_pallas_gpu.py): dq and dk / dv.

One kernel in two files: this one uses the forward file's tile helpers, and
the forward file's custom VJP calls `backward_kernels` (imported there when
the backward is traced). Residuals are the output and the float32 logsumexp
[B, N, T] (natural units); delta = rowsum(o * do) is an XLA reduction
outside the kernels.
  * dq: one program per (query head, block of queries), as the forward; it
    loops over the key blocks the mask reaches.
  * dkv: one program per (kv head, block of keys); it loops over the G query
    heads sharing that kv head and over the reachable query blocks, so dk / dv
    accumulate in registers and are written once (no atomics).
Each takes its own tiles (flash_pallas_gpu_tiles.Tiles: block_*_bwd for dq,
block_*_dkv for dkv) and Triton settings (num_*_bwd).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from meshattn.layers.kernels.train import flash_bounds as fb
from meshattn.layers.kernels.train.flash_pallas_gpu import (
    _LOG2E, _Static, _common_inputs, _compiler_params, _dot, _kv_bounds_input, _kv_ranges,
    _logits, _optional_specs, _per_q_head_specs, _q_ranges, _tile_loops, _tile_mask, _unpack)


def _probs_and_dlogits(st: _Static, q, k, v, do, lse2, delta, allowed):
  """Recompute p [bq, bkv] and d(raw logits) / scale of one tile (allowed None: no mask).

  ds = p * (dp - delta) is the softmax backward (the sink column adds no
  value, so delta = rowsum(o * do) already is sum_j p_j dp_j); the soft cap
  multiplies by its derivative 1 - tanh^2. The scale multiplies dq / dk once
  at the end instead of every tile.
  """
  s, t = _logits(st, q, k)  # [bq, bkv] log2 units
  p = jnp.exp2(s - lse2[:, None])  # [bq, bkv]
  if allowed is not None:
    p = jnp.where(allowed, p, 0.0)
  dp = _dot(do, v, trans_b=True)  # [bq, bkv]
  ds = p * (dp - delta[:, None])  # [bq, bkv]
  if t is not None:
    ds = ds * (1.0 - t * t)
  return p, ds


def _dq_kernel(*refs, st: _Static, num_kv_blocks: int):
  r = _unpack(st, refs, ("q", "k", "v", "q_pos", "kv_pos", "q_seg", "kv_seg", "bounds", "do",
                         "lse", "delta", "dq"))
  q = r["q"][...]  # [bq, H]
  do = r["do"][...]  # [bq, H]
  lse2 = r["lse"][...] * _LOG2E  # [bq]
  delta = r["delta"][...]  # [bq]
  q_pos = r["q_pos"][...]
  q_seg = None if r["q_seg"] is None else r["q_seg"][...]

  def body(j, dq, *, masked):
    kv_slice = pl.ds(j * st.block_kv, st.block_kv)
    k = r["k"][kv_slice, :]  # [bkv, H]
    v = r["v"][kv_slice, :]  # [bkv, H]
    allowed = None
    if masked:
      kv_seg = None if r["kv_seg"] is None else r["kv_seg"][kv_slice]
      allowed = _tile_mask(st, q_pos, r["kv_pos"][kv_slice], q_seg, kv_seg)  # [bq, bkv]
    _, ds = _probs_and_dlogits(st, q, k, v, do, lse2, delta, allowed)
    return dq + _dot(ds.astype(k.dtype), k)  # [bq, H]

  ranges = _kv_ranges(st, r["bounds"], pl.program_id(1), num_kv_blocks)
  dq = _tile_loops(ranges, body, jnp.zeros(q.shape, jnp.float32))
  r["dq"][...] = (dq * st.scale).astype(r["dq"].dtype)


def _dkv_kernel(*refs, st: _Static, num_q_blocks: int):
  r = _unpack(st, refs, ("q", "k", "v", "q_pos", "kv_pos", "q_seg", "kv_seg", "bounds", "do",
                         "lse", "delta", "dk", "dv"))
  k = r["k"][...]  # [bkv, H]
  v = r["v"][...]  # [bkv, H]
  kv_pos = r["kv_pos"][...]  # [bkv]
  kv_seg = None if r["kv_seg"] is None else r["kv_seg"][...]
  ranges = _q_ranges(st, r["bounds"], pl.program_id(0), num_q_blocks)

  def q_body(i, carry, *, masked, g):
    dk, dv = carry
    q_slice = pl.ds(i * st.block_q, st.block_q)
    q = r["q"][q_slice, g, :]  # [bq, H]
    do = r["do"][q_slice, g, :]  # [bq, H]
    lse2 = r["lse"][g, q_slice] * _LOG2E  # [bq]
    delta = r["delta"][g, q_slice]  # [bq]
    allowed = None
    if masked:
      q_seg = None if r["q_seg"] is None else r["q_seg"][q_slice]
      allowed = _tile_mask(st, r["q_pos"][q_slice], kv_pos, q_seg, kv_seg)  # [bq, bkv]
    p, ds = _probs_and_dlogits(st, q, k, v, do, lse2, delta, allowed)
    dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)  # [bkv, H]
    dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)  # [bkv, H]
    return dk, dv

  def g_body(g, carry):
    return _tile_loops(ranges, functools.partial(q_body, g=g), carry)

  zeros = jnp.zeros(k.shape, jnp.float32)  # [bkv, H]
  dk, dv = lax.fori_loop(0, st.group, g_body, (zeros, zeros))
  r["dk"][...] = (dk * st.scale).astype(r["dk"].dtype)
  r["dv"][...] = dv.astype(r["dv"].dtype)


def backward_kernels(st: _Static, q, k, v, q_pos, kv_pos, q_seg, kv_seg, ranges, o, lse, do):
  """dq [B, T, N, H], dk / dv [B, S, K, H] and delta [B, N, T] (float32)."""
  batch, q_len, _, head_dim = q.shape
  kv_len = k.shape[1]
  # d(sinks) is computed outside the kernels.
  st, dkv_st = (dataclasses.replace(x, has_sinks=False) for x in (st.backward(), st.dkv()))
  kh, g_, bq, bkv = st.kv_heads, st.group, st.block_q, st.block_kv
  delta = jnp.einsum("BTNH,BTNH->BNT", o.astype(jnp.float32),
                     do.astype(jnp.float32))  # [B, N, T]
  params = _compiler_params(st)

  specs = _per_q_head_specs(st, kv_len, head_dim)
  kv_bounds = _kv_bounds_input(st, q_len, kv_pos, q_seg, kv_seg, ranges)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st, num_kv_blocks=kv_len // bkv),
      grid=(g_, q_len // bq, batch * kh),
      in_specs=([specs["q"], specs["kv"], specs["kv"]] + _optional_specs(st, specs)
                + [specs["q"], specs["row"], specs["row"]]),
      out_specs=specs["q"],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=st.interpret,
      name="flash_pallas_gpu_dq",
  )(q, k, v, *_common_inputs(st, q_pos, kv_pos, q_seg, kv_seg, kv_bounds, None), do, lse, delta)

  # dkv grid (S / bkv, B * K): the G query heads of the kv head are a loop.
  st, bq, bkv = dkv_st, dkv_st.block_q, dkv_st.block_kv
  q5 = q.reshape(batch, q_len, kh, g_, head_dim)  # [B, T, K, G, H]
  do5 = do.reshape(batch, q_len, kh, g_, head_dim)  # [B, T, K, G, H]
  lse4 = lse.reshape(batch, kh, g_, q_len)  # [B, K, G, T]
  delta4 = delta.reshape(batch, kh, g_, q_len)  # [B, K, G, T]
  q_all = pl.BlockSpec((None, q_len, None, g_, head_dim),
                       lambda j, bk: (bk // kh, 0, bk % kh, 0, 0))
  kv_tile = pl.BlockSpec((None, bkv, None, head_dim), lambda j, bk: (bk // kh, j, bk % kh, 0))
  q_vec = pl.BlockSpec((None, q_len), lambda j, bk: (bk // kh, 0))
  kv_vec = pl.BlockSpec((None, bkv), lambda j, bk: (bk // kh, j))
  bounds = pl.BlockSpec((None, 4), lambda j, bk: (bk // kh, j))
  rows = pl.BlockSpec((None, None, g_, q_len), lambda j, bk: (bk // kh, bk % kh, 0, 0))
  vec_specs = ([q_vec, kv_vec] + ([q_vec, kv_vec] if st.has_segments else [])
               + ([bounds] if st.has_bounds else []))
  q_bounds = fb.q_data_bounds(st.spec, bq, bkv, q_len // bq, kv_pos, q_seg, kv_seg, ranges)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st, num_q_blocks=q_len // bq),
      grid=(kv_len // bkv, batch * kh),
      in_specs=[q_all, kv_tile, kv_tile] + vec_specs + [q_all, rows, rows],
      out_specs=[kv_tile, kv_tile],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=st.interpret,
      name="flash_pallas_gpu_dkv",
  )(q5, k, v, *_common_inputs(st, q_pos, kv_pos, q_seg, kv_seg, q_bounds, None), do5, lse4,
    delta4)
  return dq, dk, dv, delta
