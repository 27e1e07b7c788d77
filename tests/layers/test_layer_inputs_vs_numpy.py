"""The Attention layer against the float64 NumPy reference (part 2 of 2): every RoPE variant
with partial rotary and scattered positions, packing with padding, temperature tuning,
cross-attention, extra batch dims, user masks and biases, Flax attention_fn, bfloat16, jit, and
input gradients against finite differences. Tolerances and the runner: tests/helpers/layer_vs_numpy.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.layer_params import randomize, ref_settings
from helpers.layer_vs_numpy import (F32_TOL, B, D, N, T, check_padding, layer_kwargs, packed, run,
                                    scattered_positions)
from helpers.numpy_reference import attention_layer_np
from meshattn.layers import Attention, MaskSpec, RopeSpec


ROPES = {
    "default": RopeSpec("default"),
    "default_theta_min": RopeSpec("default", min_timescale=2.0, max_timescale=500.0),
    "llama3.1": RopeSpec("llama3.1", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=160),
    # Llama 4's scaling: low == high frequency factor, nothing blended.
    "llama4": RopeSpec("llama3.1", factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0,
                       original_max_position_embeddings=160),
    "yarn": RopeSpec("yarn", factor=4.0, original_max_position_embeddings=160),
    "yarn_attention_factor": RopeSpec("yarn", factor=4.0, original_max_position_embeddings=160,
                                      beta_fast=16.0, beta_slow=2.0, attention_factor=1.3),
    "yarn_zero_width_ramp": RopeSpec("yarn", factor=2.0, original_max_position_embeddings=4),
    "none": RopeSpec("none"),
}


@pytest.mark.parametrize("rope,partial", [(r, p) for r in sorted(ROPES) for p in (1.0, 0.5)
                                          if r != "none" or p == 1.0])
def test_rope_types_packed(rope, partial):
  spec = dataclasses.replace(ROPES[rope], partial_rotary_factor=partial)
  pos, seg = packed()
  res = run(layer_kwargs(rope=spec, use_bias=True, use_qk_norm=True, attention_sink=True),
            positions=pos, segments=seg)
  check_padding(res, seg)


@pytest.mark.parametrize("rope", ["default", "llama3.1", "llama4", "yarn"])
def test_rope_scattered_positions_full_attention(rope):
  """Bidirectional attention over gapped positions: every relative position
  counts, so any error in the frequencies shows."""
  pos = scattered_positions(np.random.default_rng(3), B, T)
  spec = dataclasses.replace(ROPES[rope], partial_rotary_factor=0.5)
  run(layer_kwargs(rope=spec, mask=MaskSpec("full")), positions=pos)


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
def test_temperature_tuning_nope_layer(kv_heads):
  """Llama 4's NoPE layer: no RoPE, queries scaled by log(floor((p + 1) / 4) + 1) * 0.3 + 1 at
  gapped positions up to 23 (scales 1 to 1.56), causal."""
  pos = scattered_positions(np.random.default_rng(5), B, T)
  run(layer_kwargs(num_kv_heads=kv_heads, rope=RopeSpec("none"), temperature_tuning=True,
                   temperature_tuning_scale=0.3, temperature_tuning_floor_scale=4.0),
      positions=pos)


def test_padding_without_bias_is_exactly_zero():
  pos, seg = packed()
  res = run(layer_kwargs(attention_sink=True), positions=pos, segments=seg)
  check_padding(res, seg)


def test_all_padding_row_is_finite():
  seg = np.zeros((B, T), np.int32)
  seg[0, :3] = 1
  res = run(layer_kwargs(use_bias=True), segments=seg)
  check_padding(res, seg)
  assert np.all(res["weights"][1] == 0)


# ---- cross-attention, batch dims, masks ----------------------------------------------


@pytest.mark.parametrize("attention_type", ["full", "global"])
@pytest.mark.parametrize("share_kv", [False, True])
def test_cross_attention(attention_type, share_kv):
  rng = np.random.default_rng(5)
  s = 11
  kv_pos = scattered_positions(rng, B, s)
  kv_seg = np.array([[1] * 6 + [2] * 5, [1] * 10 + [0]], np.int32)
  q_seg = np.array([[1] * 3 + [2] * 5, [1] * 7 + [0]], np.int32)
  res = run(layer_kwargs(mask=MaskSpec(attention_type), share_kv_projections=share_kv,
                         use_bias=True, kv_emb_dim=24, attention_sink=True),
            kv_len=s, kv_emb=24, positions=scattered_positions(rng, B, T),
            kv_positions=kv_pos, segments=q_seg, kv_segments=kv_seg)
  check_padding(res, q_seg)


def test_cross_attention_default_positions():
  run(layer_kwargs(mask=MaskSpec("full"), kv_emb_dim=12, use_bias=True), kv_len=5, kv_emb=12)


def test_extra_batch_dims():
  rng = np.random.default_rng(6)
  bs = (2, 3)
  pos = np.stack([scattered_positions(rng, 3, T) for _ in range(2)])  # [2, 3, T]
  seg = np.broadcast_to(np.array([1, 1, 1, 2, 2, 2, 2, 0], np.int32), bs + (T,))
  mask = rng.random((T, T)) < 0.8
  res = run(layer_kwargs(use_bias=True, attention_sink=True, mask=MaskSpec("local_sliding", window=4)),
            batch_shape=bs, positions=pos, segments=seg, mask=mask)
  assert res["out"].shape == bs + (T, D)
  check_padding(res, seg)


@pytest.mark.parametrize("shape", ["B1TS", "TS", "NTS", "BNTS"])
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_user_mask_and_bias_broadcast(shape, kv_heads):
  rng = np.random.default_rng(7)
  full = {"B1TS": (B, 1, T, T), "TS": (T, T), "NTS": (N, T, T), "BNTS": (B, N, T, T)}[shape]
  mask = rng.random(full) < 0.7
  mask[..., 2, :] = False  # a query row with nothing visible
  bias = rng.normal(size=full).astype(np.float32)
  res = run(layer_kwargs(num_kv_heads=kv_heads, mask=MaskSpec("full"), use_bias=True,
                         attention_sink=True),
            mask=mask, bias=bias)
  assert np.all(res["weights"][:, :, 2] == 0)
  assert np.all(res["out"][:, 2] == res["params"]["out.bias"])


def test_user_bias_only_with_causal():
  rng = np.random.default_rng(8)
  run(layer_kwargs(), bias=rng.normal(size=(B, 1, T, T)).astype(np.float32))


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_flax_attention_fn_path(kv_heads):
  """attention_fn=nnx.dot_product_attention (K/V repeated, masks folded, query
  pre-scaled, empty rows zeroed) against the reference: per-head user mask,
  packing with padding, a row with nothing visible, qk norm, RoPE."""
  rng = np.random.default_rng(10)
  pos, seg = packed()
  mask = rng.random((N, T, T)) < 0.8
  mask[1, 3] = False
  bias = rng.normal(size=(B, 1, T, T)).astype(np.float32)
  res = run(layer_kwargs(num_kv_heads=kv_heads, attention_fn=nnx.dot_product_attention,
                         use_bias=True, use_qk_norm=True, query_pre_attn_scalar=5.0,
                         mask=MaskSpec("local_sliding", window=4)),
            positions=pos, segments=seg, mask=mask, bias=bias)
  check_padding(res, seg)


# ---- bfloat16 ---------------------------------------------------------------------------


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("projection", ["fused", "split", "shared_kv"])
def test_bfloat16(kv_heads, projection):
  pos, seg = packed()
  kw = layer_kwargs(
      num_kv_heads=kv_heads, mask=MaskSpec("chunk", chunk=3),
      rope=RopeSpec("llama3.1", original_max_position_embeddings=160, partial_rotary_factor=0.5),
      attn_logits_soft_cap=2.0, attention_sink=True, use_qk_norm=True, use_bias=True,
      fused_qkv=projection == "fused", share_kv_projections=projection == "shared_kv")
  rng = np.random.default_rng(9)
  res = run(kw, dtype=jnp.bfloat16, positions=pos, segments=seg,
            bias=rng.normal(size=(B, 1, T, T)).astype(np.float32))
  check_padding(res, seg)


# ---- self-attention must not depend on object identity ---------------------------------


def test_self_attention_same_under_jit_with_inputs_kv_passed_separately():
  """model(x, x, inputs_positions=pos) must give the same value eagerly and
  under nnx.jit when x is handed to the jitted function twice (the reference:
  self-attention, keys rotated by `pos`)."""
  pos, seg = packed()
  kw = layer_kwargs(num_kv_heads=2)
  model = Attention(rngs=nnx.Rngs(0), **kw)
  params = randomize(model, 1)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(B, T, D)), jnp.float32)
  call = dict(inputs_positions=jnp.asarray(pos), decoder_segment_ids=jnp.asarray(seg))
  eager = np.asarray(model(x, x, **call), np.float64)
  jitted = np.asarray(nnx.jit(lambda m, a, b: m(a, b, **call))(model, x, x), np.float64)
  ref, _ = attention_layer_np(params, np.asarray(x, np.float64), q_positions=pos,
                              segment_ids=(seg, seg), **ref_settings(kw))
  scale = np.max(np.abs(ref))
  assert np.max(np.abs(eager - ref)) <= F32_TOL * scale
  assert np.max(np.abs(jitted - ref)) <= F32_TOL * scale, np.max(np.abs(jitted - ref)) / scale


# ---- gradient vs finite differences of the reference -----------------------------------


def test_input_gradient_vs_reference_finite_differences():
  """d sum(out * c) / d x_q: JAX float32 autodiff vs central differences of the
  float64 reference (GQA, sinks, QK norm, biases, sliding window, RoPE, packing)."""
  pos, seg = packed()
  kw = layer_kwargs(num_kv_heads=2, mask=MaskSpec("local_sliding", window=3),
                    rope=RopeSpec("default", partial_rotary_factor=0.5), attn_logits_soft_cap=2.0,
                    attention_sink=True, use_qk_norm=True, use_bias=True)
  model = Attention(rngs=nnx.Rngs(0), **kw)
  params = randomize(model, 11)
  rng = np.random.default_rng(12)
  x = rng.normal(size=(B, T, D)).astype(np.float32)
  cot = rng.normal(size=(B, T, D))
  pos_j, seg_j = jnp.asarray(pos), jnp.asarray(seg)

  def loss(x):
    out = model(x, inputs_positions=pos_j, decoder_segment_ids=seg_j)
    return jnp.sum(out * jnp.asarray(cot, jnp.float32))

  g = np.asarray(jax.grad(loss)(jnp.asarray(x)), np.float64)
  assert np.all(np.isfinite(g))

  ref_kw = dict(ref_settings(kw), q_positions=pos, segment_ids=(seg, seg), sinks=params["sinks"])

  def ref_loss(xx):
    return float(np.sum(attention_layer_np(params, xx, **ref_kw)[0] * cot))

  eps = 1e-4
  x64 = x.astype(np.float64)
  fd = np.zeros_like(x64)
  for idx in np.ndindex(x64.shape):
    plus, minus = x64.copy(), x64.copy()
    plus[idx] += eps
    minus[idx] -= eps
    fd[idx] = (ref_loss(plus) - ref_loss(minus)) / (2 * eps)
  err = np.max(np.abs(g - fd)) / np.max(np.abs(fd))
  assert err < 1e-3, err
  # Padding tokens influence nothing but their own (constant) output.
  assert np.all(g[np.asarray(seg) == 0] == 0)
