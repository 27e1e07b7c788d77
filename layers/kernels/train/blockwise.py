"""Blockwise (flash-style) attention in pure JAX, forward and backward.

The reference kernel (dot_product.py) materialises the [B, K, G, T, S] logits
and lets autodiff keep them for the backward pass, so memory grows with T * S.
Here the logits only ever exist one [block_q, block_kv] tile at a time:

* forward: for each block of queries, an online softmax runs over the blocks
  of keys (running max m, running sum l, running weighted values acc, all
  float32); the result is exact softmax attention, not an approximation.
* backward (jax.custom_vjp): the residuals are the inputs, the output and the
  per-row logsumexp [B, K, G, T]; each tile's logits are recomputed and
  dq, dk, dv (and d sinks, d bias, d of arrays a score_mod closes over) are
  accumulated tile by tile. Without the custom VJP, autodiff of the loops
  would store every tile's probabilities: O(T * S) again.

Every feature matches dot_product_attention, in the same order of operations:
  logits = (q . k) * scale  (+ bias)  -> score_mod  -> soft cap
  -> mask (structural & segments & user mask & mask_mod)
  -> float32 softmax over [keys..., sink], the sink taking mass but no value.
GQA / MQA never repeat K/V (queries viewed [B, T, K, G, H]). A row with no
visible key gives zeros and finite (zero) gradients. Masks select, never
multiply: what an invisible token holds (NaN, inf) reaches neither a visible
output nor a gradient (online_softmax.py). Dropout and returning
the weights are not supported (they need the full probability matrix) and
raise; BLOCKWISE_FEATURES is what its checks and its registry row read.

T and S are padded to multiples of the block sizes; padding keys get
position -1 (an empty slot, never attended) and padded query rows are
dropped, so any length works with any block size.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from meshattn.layers.kernels.shared.online_softmax import (
    NEG, hide, live_keys, live_queries, online_step)
from meshattn.layers.kernels.api import KernelOptions, TrainCall, train_kernel
from meshattn.layers.kernels.registry import ALL, FLOAT32, train_variant
from meshattn.layers.kernels.train.dot_product import mod_indices, to_group_layout, visible_mask

BLOCKWISE_FEATURES = frozenset({
    "gqa", "causal", "full", "window", "chunk", "segment_ids", "soft_cap", "sinks", "user_mask",
    "user_bias", "score_mod", "mask_mod", "backward"})



@dataclasses.dataclass(frozen=True, eq=False)
class _Config:
  """Static (non-array) description of one call, a nondiff argument of the VJP.

  score_fn / mask_fn are the user's hooks closure-converted for one tile:
  arrays they close over that may carry gradients are passed as explicit
  arguments (score_consts / mask_consts), which custom_vjp requires.
  """

  options: KernelOptions  # mask_mod cleared: applied through mask_fn
  block_q: int
  block_kv: int
  kv_heads: int
  group: int
  score_fn: Callable[..., jax.Array] | None
  mask_fn: Callable[..., jax.Array] | None
  score_diff: tuple[bool, ...]  # which score_consts are inexact (get a cotangent)
  bias_diff: bool  # whether the bias is inexact (gets a cotangent)


def _slice(x, start, size, axis):
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _raw_scores(q_blk, k_blk, options: KernelOptions):
  """q . k of one tile, in the dtype the reference kernel computes it."""
  return jnp.einsum(
      "BTKGH,BSKH->BKGTS", q_blk, k_blk, precision=options.precision,
      preferred_element_type=jnp.float32 if options.float32_qk_product else None)  # [B, K, G, t, s]


def _scores(cfg: _Config, raw, bias_blk, score_consts, indices):
  """raw q . k -> logits before masking: scale, bias, score_mod, soft cap.

  A separate function of (raw, bias, score_consts) so that the backward can
  take its jax.vjp: any differentiable score_mod works without a hand-written
  derivative.
  """
  options = cfg.options
  logits = raw.astype(jnp.float32) if options.float32_logits else raw
  logits = logits * jnp.asarray(options.scale, logits.dtype)
  if bias_blk is not None:
    logits = logits + bias_blk.astype(logits.dtype)
  if cfg.score_fn is not None:
    logits = cfg.score_fn(logits, *indices, *score_consts).astype(logits.dtype)
  if options.soft_cap:
    cap = jnp.asarray(options.soft_cap, logits.dtype)
    logits = cap * jnp.tanh(logits / cap)
  return logits  # [B, K, G, t, s]


def _allowed(cfg: _Config, q_pos, kv_pos, q_seg, kv_seg, mask_blk, mask_consts, indices):
  """Visibility of one tile, the reference's visible_mask plus the converted mask_mod."""
  allowed = visible_mask(cfg.options, q_pos, kv_pos, q_seg, kv_seg, mask_blk)  # [B, 1|K, 1|G, t, s]
  if cfg.mask_fn is not None:
    allowed = allowed & cfg.mask_fn(*indices, *mask_consts).astype(bool)
  return allowed


def _hide_tile(allowed, q_blk, k_blk, v_blk):
  """The tile's q [B, t, K, G, H], k, v [B, s, K, H] with the rows no pair of it uses zeroed.

  Padding tokens and empty slots may hold NaN / inf; a mask multiplied in
  (p = 0 against V = NaN, dLogits = 0 against K or Q = NaN) would leak them.
  """
  live_k = live_keys(allowed)  # [B, s, 1|K, 1]
  return hide(q_blk, live_queries(allowed)), hide(k_blk, live_k), hide(v_blk, live_k)


class _Tiles:
  """Slices the padded inputs into the (i-th query block, j-th key block) tile."""

  def __init__(self, cfg, q5, k, v, bias5, q_pos, kv_pos, q_seg, kv_seg, mask5):
    self.cfg = cfg
    self.q5, self.k, self.v, self.bias5, self.mask5 = q5, k, v, bias5, mask5
    self.q_pos, self.kv_pos, self.q_seg, self.kv_seg = q_pos, kv_pos, q_seg, kv_seg

  def q_block(self, i):
    bq = self.cfg.block_q
    start = i * bq
    return (_slice(self.q5, start, bq, 1), _slice(self.q_pos, start, bq, 1),
            _slice(self.q_seg, start, bq, 1))  # [B, t, K, G, H], [B, t], [B, t]

  def kv_block(self, j):
    bk = self.cfg.block_kv
    start = j * bk
    return (_slice(self.k, start, bk, 1), _slice(self.v, start, bk, 1),
            _slice(self.kv_pos, start, bk, 1), _slice(self.kv_seg, start, bk, 1))

  def pair(self, i, j):
    """Bias and mask tiles [B, 1|K, 1|G, t, s]."""
    bq, bk = self.cfg.block_q, self.cfg.block_kv
    tile = lambda x: _slice(_slice(x, i * bq, bq, 3), j * bk, bk, 4)
    return tile(self.bias5), tile(self.mask5)


def _forward(cfg: _Config, q5, k, v, sinks, bias5, score_consts, q_pos, kv_pos, q_seg, kv_seg,
             mask5, mask_consts):
  """Online-softmax forward: (output [B, T, K, G, Hv], logsumexp [B, K, G, T] f32)."""
  batch, q_len, kv_heads, group, _ = q5.shape
  value_dim = v.shape[-1]
  bq, bk = cfg.block_q, cfg.block_kv
  num_q, num_kv = q_len // bq, k.shape[1] // bk
  tiles = _Tiles(cfg, q5, k, v, bias5, q_pos, kv_pos, q_seg, kv_seg, mask5)
  shape = (batch, kv_heads, group, bq)
  if sinks is not None:
    # The sink is the first "key": running max = sink, running sum = exp(0).
    m0 = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv_heads, group, 1), shape)
    l0 = jnp.ones(shape, jnp.float32)
  else:
    m0 = jnp.full(shape, NEG, jnp.float32)
    l0 = jnp.zeros(shape, jnp.float32)
  acc0 = jnp.zeros(shape + (value_dim,), jnp.float32)

  def q_step(i):
    q_blk, qp, qs = tiles.q_block(i)  # [B, t, K, G, H]

    def kv_step(carry, j):
      k_blk, v_blk, kp, ks = tiles.kv_block(j)  # [B, s, K, H]
      bias_blk, mask_blk = tiles.pair(i, j)
      indices = mod_indices(batch, kv_heads, group, qp, kp)
      allowed = _allowed(cfg, qp, kp, qs, ks, mask_blk, mask_consts, indices)  # [B, 1|K, 1|G, t, s]

      def update(carry):
        m, l, acc = carry  # [B, K, G, t], [B, K, G, t], [B, K, G, t, Hv]
        q_t, k_t, v_t = _hide_tile(allowed, q_blk, k_blk, v_blk)
        logits = _scores(cfg, _raw_scores(q_t, k_t, cfg.options), bias_blk, score_consts,
                         indices).astype(jnp.float32)  # [B, K, G, t, s]
        m_new, l_new, p, correction = online_step(m, l, logits, allowed)  # p: [B, K, G, t, s]
        acc_new = acc * correction[..., None] + jnp.einsum(
            "BKGTS,BSKH->BKGTH", p.astype(v.dtype), v_t, precision=cfg.options.precision,
            preferred_element_type=jnp.float32)  # [B, K, G, t, Hv]
        return m_new, l_new, acc_new

      # Tiles with nothing visible (most of the upper triangle under a causal
      # mask, other documents under segment ids) cost only their mask.
      return jax.lax.cond(jnp.any(allowed), update, lambda c: c, carry), None

    (m, l, acc), _ = jax.lax.scan(kv_step, (m0, l0, acc0), jnp.arange(num_kv))
    # [B, K, G, t]: false only for rows with no key and no sink (a NaN that reached a visible
    # key stays NaN: `l > 0` would read it as "nothing visible" and hide it as zeros)
    visible = l != 0
    out = jnp.where(visible[..., None], acc / jnp.where(visible, l, 1.0)[..., None], 0.0)
    # For a row with nothing visible any finite lse works: the backward
    # zeroes every probability of a masked pair.
    lse = jnp.where(visible, m + jnp.log(jnp.where(visible, l, 1.0)), 0.0)  # [B, K, G, t]
    return out.astype(v.dtype), lse

  out, lse = jax.lax.map(q_step, jnp.arange(num_q))  # [nq, B, K, G, t, Hv], [nq, B, K, G, t]
  out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(batch, q_len, kv_heads, group, value_dim)
  lse = jnp.transpose(lse, (1, 2, 3, 0, 4)).reshape(batch, kv_heads, group, q_len)
  return out, lse  # [B, T, K, G, Hv], [B, K, G, T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg, q5, k, v, sinks, bias5, score_consts, q_pos, kv_pos, q_seg, kv_seg, mask5,
               mask_consts):
  return _forward(cfg, q5, k, v, sinks, bias5, score_consts, q_pos, kv_pos, q_seg, kv_seg, mask5,
                  mask_consts)[0]


def _attention_fwd(cfg, q5, k, v, sinks, bias5, score_consts, q_pos, kv_pos, q_seg, kv_seg, mask5,
                   mask_consts):
  out, lse = _forward(cfg, q5, k, v, sinks, bias5, score_consts, q_pos, kv_pos, q_seg, kv_seg,
                      mask5, mask_consts)
  residuals = (q5, k, v, sinks, bias5, score_consts, q_pos, kv_pos, q_seg, kv_seg, mask5,
               mask_consts, out, lse)
  return out, residuals


def _attention_bwd(cfg, residuals, d_out):
  """Recomputes each tile's probabilities from the logsumexp (flash-attention 2).

  With P the probabilities (sink column included) and dO the output cotangent:
    dV = P^T dO,  dP = dO V^T,  D = rowsum(dO * O),  dLogits = P * (dP - D)
  (the sink has no value, so its dP is 0: d sink = -sum P_sink * D). dLogits
  goes back through the tile's score function (soft cap, score_mod, bias,
  scale) with jax.vjp, giving d(q . k), d bias and d score_consts.
  """
  (q5, k, v, sinks, bias5, score_consts, q_pos, kv_pos, q_seg, kv_seg, mask5, mask_consts, out,
   lse) = residuals
  batch, q_len, kv_heads, group, _ = q5.shape
  bq, bk = cfg.block_q, cfg.block_kv
  num_q, num_kv = q_len // bq, k.shape[1] // bk
  tiles = _Tiles(cfg, q5, k, v, bias5, q_pos, kv_pos, q_seg, kv_seg, mask5)
  delta = jnp.einsum("BTKGH,BTKGH->BKGT", d_out.astype(jnp.float32),
                     out.astype(jnp.float32))  # [B, K, G, T]
  diff_consts = [c for c, d in zip(score_consts, cfg.score_diff) if d]
  fixed_consts = [c for c, d in zip(score_consts, cfg.score_diff) if not d]
  bias_diff = bias5 is not None and cfg.bias_diff

  def merge_consts(diff):
    diff, fixed = iter(diff), iter(fixed_consts)
    return [next(diff) if d else next(fixed) for d in cfg.score_diff]

  def kv_step(outer, j):
    dq, d_consts = outer  # [B, T, K, G, H] f32, float32 like diff_consts
    k_blk, v_blk, kp, ks = tiles.kv_block(j)  # [B, s, K, H]

    def q_step(inner, i):
      dk, dv, dq, d_consts = inner  # [B, s, K, H], [B, s, K, Hv] f32
      q_blk, qp, qs = tiles.q_block(i)  # [B, t, K, G, H]
      bias_blk, mask_blk = tiles.pair(i, j)
      indices = mod_indices(batch, kv_heads, group, qp, kp)
      allowed = _allowed(cfg, qp, kp, qs, ks, mask_blk, mask_consts, indices)  # [B, 1|K, 1|G, t, s]
      lse_blk = _slice(lse, i * bq, bq, 3)  # [B, K, G, t]

      def compute(inner):
        dk, dv, dq, d_consts = inner
        q_t, k_t, v_t = _hide_tile(allowed, q_blk, k_blk, v_blk)
        # A query that sees nothing in this tile may come with a NaN cotangent
        # (a padding row): its dO is zeroed, or p^T dO would carry it to dv; its
        # NaN delta is selected away in d_logits below.
        do_blk = hide(_slice(d_out, i * bq, bq, 1), live_queries(allowed))  # [B, t, K, G, Hv]
        score = lambda raw, bb, dc: _scores(cfg, raw, bb if bias_diff else bias_blk,
                                            merge_consts(dc), indices)
        raw = _raw_scores(q_t, k_t, cfg.options)  # [B, K, G, t, s]
        scores, score_vjp = jax.vjp(score, raw, bias_blk if bias_diff else None, diff_consts)
        logits = jnp.where(allowed, scores.astype(jnp.float32), NEG)  # [B, K, G, t, s]
        p = jnp.where(allowed, jnp.exp(logits - lse_blk[..., None]), 0.0)  # [B, K, G, t, s]
        dv = dv + jnp.einsum("BKGTS,BTKGH->BSKH", p.astype(v.dtype), do_blk,
                             precision=cfg.options.precision,
                             preferred_element_type=jnp.float32)  # [B, s, K, Hv]
        dp = jnp.einsum("BTKGH,BSKH->BKGTS", do_blk, v_t, precision=cfg.options.precision,
                        preferred_element_type=jnp.float32)  # [B, K, G, t, s]
        delta_blk = _slice(delta, i * bq, bq, 3)[..., None]  # [B, K, G, t, 1]
        d_logits = jnp.where(allowed, p * (dp - delta_blk), 0.0)  # [B, K, G, t, s]
        d_raw, d_bias, d_c = score_vjp(d_logits.astype(scores.dtype))  # d_raw [B, K, G, t, s]
        dq_blk = jnp.einsum("BKGTS,BSKH->BTKGH", d_raw, k_t, precision=cfg.options.precision,
                            preferred_element_type=jnp.float32)  # [B, t, K, G, H]
        dq = jax.lax.dynamic_update_slice_in_dim(
            dq, _slice(dq, i * bq, bq, 1) + dq_blk, i * bq, 1)  # [B, T, K, G, H]
        dk = dk + jnp.einsum("BKGTS,BTKGH->BSKH", d_raw, q_t, precision=cfg.options.precision,
                             preferred_element_type=jnp.float32)  # [B, s, K, H]
        d_consts = [a + b.astype(jnp.float32) for a, b in zip(d_consts, d_c)]
        d_bias = d_bias.astype(jnp.float32) if bias_diff else None
        return (dk, dv, dq, d_consts), d_bias

      def skip(inner):
        return inner, (jnp.zeros(bias_blk.shape, jnp.float32) if bias_diff else None)

      return jax.lax.cond(jnp.any(allowed), compute, skip, inner)

    dk0 = jnp.zeros(k_blk.shape, jnp.float32)  # [B, s, K, H]
    dv0 = jnp.zeros(v_blk.shape, jnp.float32)  # [B, s, K, Hv]
    (dk, dv, dq, d_consts), d_bias = jax.lax.scan(
        q_step, (dk0, dv0, dq, d_consts), jnp.arange(num_q))  # d_bias [nq, B, 1|K, 1|G, t, s]
    return (dq, d_consts), (dk, dv, d_bias)

  dq0 = jnp.zeros(q5.shape, jnp.float32)
  d_consts0 = [jnp.zeros(c.shape, jnp.float32) for c in diff_consts]
  (dq, d_consts), (dk, dv, d_bias) = jax.lax.scan(kv_step, (dq0, d_consts0), jnp.arange(num_kv))
  dk = jnp.swapaxes(dk, 0, 1).reshape(k.shape)  # [nk, B, s, K, H] -> [B, S, K, H]
  dv = jnp.swapaxes(dv, 0, 1).reshape(v.shape)  # [B, S, K, Hv]
  if bias_diff:
    # [nk, nq, B, 1|K, 1|G, t, s] -> [B, 1|K, 1|G, nq, t, nk, s]
    d_bias = jnp.transpose(d_bias, (2, 3, 4, 1, 5, 0, 6)).reshape(bias5.shape).astype(bias5.dtype)
  else:
    d_bias = None
  d_sinks = None
  if sinks is not None:
    p_sink = jnp.exp(sinks.astype(jnp.float32).reshape(1, kv_heads, group, 1) - lse)  # [B, K, G, T]
    d_sinks = -(p_sink * delta).sum((0, 3)).reshape(sinks.shape).astype(sinks.dtype)  # [N]
  d_consts = iter(d_consts)
  d_score_consts = [next(d_consts).astype(c.dtype) if d else None
                    for c, d in zip(score_consts, cfg.score_diff)]
  return (dq.astype(q5.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_sinks, d_bias,
          d_score_consts, None, None, None, None, None, [None] * len(mask_consts))


_attention.defvjp(_attention_fwd, _attention_bwd)


def _pad(x, axis, size, value):
  if x is None or x.shape[axis] == size:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def _inexact(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


@train_variant("blockwise", ALL, BLOCKWISE_FEATURES | FLOAT32,
               "pure-JAX online softmax, custom VJP", block_keywords=("block_q", "block_kv"))
@train_kernel("blockwise_attention", BLOCKWISE_FEATURES)
def blockwise_attention(query: jax.Array, key: jax.Array, value: jax.Array, call: TrainCall, *,
                        block_q: int = 512, block_kv: int = 512) -> tuple[jax.Array, None]:
  """Attention of query [B, T, N, H] over key/value [B, S, K, H], blockwise.

  Same arguments and result as dot_product_attention (see there), plus the
  tile sizes block_q / block_kv (clamped to T / S). Logit memory is
  O(block_q * block_kv) per (batch, head) in the forward and the backward.

  Returns (context [B, T, N, H], None): the weights are never materialised.
  """
  if block_q <= 0 or block_kv <= 0:
    raise ValueError(f"block sizes must be > 0, got block_q={block_q}, block_kv={block_kv}")
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  group = num_heads // kv_heads

  bq, bk = min(block_q, q_len), min(block_kv, kv_len)
  q_pad, kv_pad = -(-q_len // bq) * bq, -(-kv_len // bk) * bk
  q5 = _pad(query.reshape(batch, q_len, kv_heads, group, head_dim), 1, q_pad, 0)  # [B, T', K, G, H]
  k = _pad(key, 1, kv_pad, 0)  # [B, S', K, H]
  v = _pad(value, 1, kv_pad, 0)  # [B, S', K, Hv]
  q_pos = _pad(call.q_positions, 1, q_pad, 0)  # [B, T']: padded rows are dropped below
  kv_pos = _pad(call.kv_positions, 1, kv_pad, -1)  # [B, S']: -1 = empty slot, never attended
  q_seg = _pad(call.q_segment_ids, 1, q_pad, 0)
  kv_seg = _pad(call.kv_segment_ids, 1, kv_pad, 0)
  bias5 = to_group_layout(call.bias, batch, kv_heads, q_len, kv_len, "bias")  # [B, 1|K, 1|G, T, S]
  bias5 = _pad(_pad(bias5, 3, q_pad, 0), 4, kv_pad, 0)  # [B, 1|K, 1|G, T', S']
  mask5 = to_group_layout(call.mask, batch, kv_heads, q_len, kv_len, "mask")
  if mask5 is not None:
    mask5 = _pad(_pad(mask5.astype(bool), 3, q_pad, False), 4, kv_pad, False)

  # The hooks see one tile at a time; closure conversion hoists the arrays
  # they close over that may carry gradients (e.g. a learned relative-bias
  # table), so that custom_vjp can return cotangents for them.
  indices = mod_indices(batch, kv_heads, group, q_pos[:, :bq], kv_pos[:, :bk])
  score_fn, score_consts, mask_fn, mask_consts = None, [], None, []
  if call.options.score_mod is not None:
    raw = jax.eval_shape(functools.partial(_raw_scores, options=call.options), q5[:, :bq], k[:, :bk])
    dtype = jnp.float32 if call.options.float32_logits else raw.dtype
    example = jnp.zeros(raw.shape, dtype)  # [B, K, G, t, s]
    score_fn, score_consts = jax.closure_convert(call.options.score_mod, example, *indices)
  if call.options.mask_mod is not None:
    mask_fn, mask_consts = jax.closure_convert(call.options.mask_mod, *indices)
  cfg = _Config(
      options=dataclasses.replace(call.options, mask_mod=None), block_q=bq, block_kv=bk,
      kv_heads=kv_heads, group=group, score_fn=score_fn, mask_fn=mask_fn,
      score_diff=tuple(_inexact(c) for c in score_consts),
      bias_diff=bias5 is not None and _inexact(bias5))
  out = _attention(cfg, q5, k, v, call.sinks, bias5, list(score_consts), q_pos, kv_pos, q_seg, kv_seg,
                   mask5, list(mask_consts))  # [B, T', K, G, Hv]
  context = out[:, :q_len].reshape(batch, q_len, num_heads, value.shape[-1])  # [B, T, N, Hv]
  return context, None
