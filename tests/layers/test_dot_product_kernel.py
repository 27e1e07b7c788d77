"""The reference JAX kernel (`dot_product_attention`) against the float64 NumPy core.

The layer tests drive the kernel with token indices as positions; here the
kernel gets what a KV cache will give it: query positions past the start,
keys in arbitrary slot order and empty slots (key position < 0), plus
per-head masks / biases (GQA head layout), sinks, soft cap, and the bfloat16
paths with float32 logits. The visibility rule is written out here from the
MaskSpec documentation, on positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.numpy_reference import attention_core_np
from meshattn.layers import KernelOptions, MaskSpec, dot_product_attention

B, T, S, N, H = 2, 3, 8, 4, 8


def visible_on_positions(attention_type, q_pos, kv_pos, window=None, chunk=None):
  """[B, 1, T, S] from positions: empty slots (< 0) never; causal on positions."""
  vis = np.zeros((q_pos.shape[0], 1, q_pos.shape[1], kv_pos.shape[1]), bool)
  for b in range(q_pos.shape[0]):
    for t, qp in enumerate(q_pos[b]):
      for s, kp in enumerate(kv_pos[b]):
        ok = kp >= 0
        if attention_type != "full":
          ok = ok and kp <= qp
        if attention_type == "local_sliding":
          ok = ok and qp - kp < window
        if attention_type == "chunk":
          ok = ok and qp // chunk == kp // chunk
        vis[b, 0, t, s] = ok
  return vis


def cache_like_inputs(rng, kv_heads):
  q = rng.normal(size=(B, T, N, H)).astype(np.float32)
  k = rng.normal(size=(B, S, kv_heads, H)).astype(np.float32)
  v = rng.normal(size=(B, S, kv_heads, H)).astype(np.float32)
  q_pos = np.array([[5, 6, 7], [2, 3, 4]], np.int32)  # decoding past the start
  kv_pos = np.array([[4, 0, 6, 2, 7, 1, 5, 3],  # a ring buffer: slot order != position order
                     [0, 1, 2, 3, 4, -1, -1, -1]], np.int32)  # empty slots at the end
  return q, k, v, q_pos, kv_pos


@pytest.mark.parametrize("attention_type", ["global", "local_sliding", "chunk", "full"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_kernel_on_cache_positions(kv_heads, attention_type):
  rng = np.random.default_rng(0)
  q, k, v, q_pos, kv_pos = cache_like_inputs(rng, kv_heads)
  window, chunk = 3, 4
  spec = MaskSpec(attention_type, window=window if attention_type == "local_sliding" else None,
                  chunk=chunk if attention_type == "chunk" else None)
  sinks = rng.normal(size=N).astype(np.float32)
  mask = rng.random((B, N, T, S)) < 0.8  # per head: exercises the K x G layout
  bias = rng.normal(size=(N, T, S)).astype(np.float32)
  opts = KernelOptions(mask=spec, scale=0.41, soft_cap=1.7)
  ctx, w = dot_product_attention(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), options=opts, q_positions=jnp.asarray(q_pos),
      kv_positions=jnp.asarray(kv_pos), sinks=jnp.asarray(sinks), mask=jnp.asarray(mask),
      bias=jnp.asarray(bias), return_weights=True)
  vis = visible_on_positions(attention_type, q_pos, kv_pos, window, chunk) & mask
  ref_ctx, ref_w = attention_core_np(q, k, v, scale=0.41, visible=vis, soft_cap=1.7, sinks=sinks,
                                     bias=bias)
  assert np.max(np.abs(np.asarray(w) - ref_w)) <= 1e-5
  err = np.max(np.abs(np.asarray(ctx) - ref_ctx)) / np.max(np.abs(ref_ctx))
  assert err <= 1e-5, err
  assert np.all(np.asarray(w)[1, :, :, 5:] == 0)  # empty slots


@pytest.mark.parametrize("f32_logits", [False, True])
@pytest.mark.parametrize("f32_qk", [False, True])
def test_kernel_bfloat16(f32_qk, f32_logits):
  rng = np.random.default_rng(1)
  q, k, v, q_pos, kv_pos = cache_like_inputs(rng, 2)
  sinks = rng.normal(size=N).astype(np.float32)
  bias = rng.normal(size=(B, 1, T, S)).astype(np.float32)
  opts = KernelOptions(mask=MaskSpec("global"), scale=H ** -0.5, soft_cap=2.0,
                       float32_qk_product=f32_qk, float32_logits=f32_logits)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  ctx, w = dot_product_attention(bf(q), bf(k), bf(v), options=opts, q_positions=jnp.asarray(q_pos),
                                 kv_positions=jnp.asarray(kv_pos), sinks=bf(sinks),
                                 bias=jnp.asarray(bias), return_weights=True)
  assert ctx.dtype == jnp.bfloat16
  # Reference on the bf16-rounded inputs: only the arithmetic differs.
  r = lambda a: np.asarray(bf(a), np.float64)
  ref_ctx, _ = attention_core_np(r(q), r(k), r(v), scale=H ** -0.5,
                                 visible=visible_on_positions("global", q_pos, kv_pos),
                                 soft_cap=2.0, sinks=r(sinks), bias=bias)
  err = np.max(np.abs(np.asarray(ctx, np.float64) - ref_ctx)) / np.max(np.abs(ref_ctx))
  assert err <= 2e-2, err


@pytest.mark.parametrize("with_sinks", [False, True])
def test_fully_masked_rows_zero_and_finite_gradients(with_sinks):
  """Rows with no visible key: zero context and weights, and NaN-free gradients."""
  rng = np.random.default_rng(2)
  q, k, v, q_pos, kv_pos = cache_like_inputs(rng, 2)
  q_seg = np.array([[1, 0, 1], [0, 0, 2]], np.int32)
  kv_seg = np.ones((B, S), np.int32)
  sinks = jnp.asarray(rng.normal(size=N), jnp.float32) if with_sinks else None
  opts = KernelOptions(mask=MaskSpec("global"), scale=0.5)

  def f(q, k, v):
    ctx, _ = dot_product_attention(q, k, v, options=opts, q_positions=jnp.asarray(q_pos),
                                   kv_positions=jnp.asarray(kv_pos), q_segment_ids=jnp.asarray(q_seg),
                                   kv_segment_ids=jnp.asarray(kv_seg), sinks=sinks)
    return ctx

  ctx = np.asarray(f(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
  assert np.all(ctx[q_seg == 0] == 0)
  assert np.all(ctx[1, 2] == 0)  # segment 2 has no key
  assert np.all(np.isfinite(ctx))
  grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads[0])[q_seg == 0] == 0)
  vis = visible_on_positions("global", q_pos, kv_pos) & (
      (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0))[:, None]
  ref_ctx, _ = attention_core_np(q, k, v, scale=0.5, visible=vis,
                                 sinks=None if sinks is None else np.asarray(sinks))
  assert np.max(np.abs(ctx - ref_ctx)) <= 1e-5 * np.max(np.abs(ref_ctx))
