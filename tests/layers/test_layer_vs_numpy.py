"""The Attention layer against the independent float64 NumPy reference.

Every feature of the layer (MHA/GQA/MQA, every attention type, soft cap,
sinks, QK norm, biases, fused / shared projections, every RoPE variant with
partial rotary and non-trivial positions, packing with padding, the
query_pre_attn_scalar, cross-attention, extra batch dims, user masks and
biases, qkv_features / out_features) is checked on tiny shapes with random
parameters (biases, norm scales and sinks included), comparing both the
output and the sown attention weights.

Tolerances: float32 max |layer - ref| <= 1e-5 * max |ref| (weights: 1e-5
absolute, they are probabilities); bfloat16 compute (float32 weights) 2e-2.
The random parameters keep logits O(1) (kernels ~ N(0, 1/fan_in)), so a wrong
scale, cap, sink or head grouping changes the output at the 1e-1 level, far
above these tolerances.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.layer_params import randomize, ref_settings
from helpers.numpy_reference import attention_layer_naive, attention_layer_np
from meshattn.layers import Attention, MaskSpec, RopeSpec

B, T, D, N, H = 2, 8, 32, 4, 8
F32_TOL = 1e-5
BF16_TOL = 2e-2

# ---- building, randomising, reading the layer -------------------------------------


def packed(batch: int = B, length: int = T):
  """Packed positions / segment ids with a padding tail, and one row whose
  positions are not an arithmetic progression (so RoPE differences differ from
  index differences; with contiguous packing RoPE could not tell them apart)."""
  assert length == 8
  pos = np.array([[0, 1, 2, 3, 4, 0, 1, 2],
                  [0, 2, 3, 7, 0, 5, 6, 0]], np.int32)
  seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2],
                  [3, 3, 3, 3, 4, 4, 4, 0]], np.int32)  # last token: padding
  return pos[:batch], seg[:batch]


def scattered_positions(rng, batch: int, length: int):
  """Increasing, gapped positions in [0, 24): RoPE angles that differ from the index."""
  return np.stack([np.sort(rng.choice(24, size=length, replace=False)) for _ in range(batch)]
                  ).astype(np.int32)


def layer_kwargs(**kw):
  base = dict(emb_dim=D, num_query_heads=N, num_kv_heads=2, head_dim=H)
  base.update(kw)
  if base.get("qkv_features") is not None and "head_dim" not in kw:
    base.pop("head_dim")
  return base


def run(kw: dict, *, seed: int = 0, batch_shape=(B,), q_len=T, kv_len=None, kv_emb=None,
        positions=None, kv_positions=None, segments=None, kv_segments=None, mask=None,
        bias=None, dtype=jnp.float32):
  """Build, randomise, call the layer and the reference; compare; return both."""
  kw = dict(kw)
  if dtype != jnp.float32:
    kw.update(dtype=dtype, weight_dtype=jnp.float32)
  model = Attention(rngs=nnx.Rngs(seed), **kw)
  params = randomize(model, seed + 100)
  rng = np.random.default_rng(seed + 200)
  x_q = rng.normal(size=batch_shape + (q_len, kw["emb_dim"])).astype(np.float32)
  cross = kv_len is not None or kv_emb is not None
  x_kv = None
  if cross:
    x_kv = rng.normal(size=batch_shape + (kv_len or q_len, kv_emb or kw["emb_dim"])).astype(np.float32)
  s_len = x_kv.shape[-2] if cross else q_len

  call = dict(inputs_positions=positions, decoder_segment_ids=segments,
              inputs_kv_positions=kv_positions, kv_segment_ids=kv_segments, mask=mask, bias=bias)
  call = {k: (None if v is None else jnp.asarray(v)) for k, v in call.items()}
  xq_j = jnp.asarray(x_q, dtype)
  xkv_j = None if x_kv is None else jnp.asarray(x_kv, dtype)
  out, sown = nnx.capture(model, nnx.Intermediate)(xq_j, xkv_j, model_mode="train",
                                                    sow_weights=True, **call)
  assert out.dtype == dtype
  weights = None
  if kw.get("attention_fn") is None:  # a Flax attention_fn returns no weights
    weights = jax.tree.leaves(sown["attention_weights"])[0]
    assert weights.shape == batch_shape + (model.settings.num_query_heads, q_len, s_len)

  # Reference on the flattened batch; inputs exactly as the layer saw them.
  flat_b = math.prod(batch_shape)
  flat = lambda a, trailing: None if a is None else np.broadcast_to(
      a, batch_shape + np.shape(a)[np.ndim(a) - trailing:]).reshape((flat_b,) + np.shape(a)[np.ndim(a) - trailing:])
  q_pos = flat(positions, 1)
  if q_pos is None:
    q_pos = np.broadcast_to(np.arange(q_len), (flat_b, q_len))
  kv_pos = flat(kv_positions, 1)
  if kv_pos is None:
    # The layer's rule: keys share the query positions when the lengths match.
    kv_pos = q_pos if s_len == q_len else np.broadcast_to(np.arange(s_len), (flat_b, s_len))
  seg = None
  if segments is not None:
    seg = (flat(segments, 1), flat(kv_segments if kv_segments is not None else segments, 1))

  def pairwise(a):  # [batch..., N|1, T, S] or shorter -> broadcastable [B', N|1, T, S]
    if a is None:
      return None
    a = np.asarray(a)
    a = a.reshape((1,) * (len(batch_shape) + 3 - a.ndim) + a.shape)
    a = np.broadcast_to(a, batch_shape + a.shape[len(batch_shape):])
    return a.reshape((flat_b,) + a.shape[len(batch_shape):])

  ref_out, ref_w = attention_layer_np(
      params, np.asarray(xq_j, np.float64).reshape(flat_b, q_len, -1),
      None if x_kv is None else np.asarray(xkv_j, np.float64).reshape(flat_b, s_len, -1),
      q_positions=q_pos, kv_positions=kv_pos, segment_ids=seg,
      sinks=params.get("sinks"), mask=pairwise(mask), bias=pairwise(bias), **ref_settings(kw))
  ref_out = ref_out.reshape(batch_shape + ref_out.shape[1:])
  ref_w = ref_w.reshape(batch_shape + ref_w.shape[1:])

  got = np.asarray(out, np.float64)
  assert np.all(np.isfinite(got))
  tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
  err = np.max(np.abs(got - ref_out)) / np.max(np.abs(ref_out))
  assert err <= tol, f"output: max |layer - ref| / max |ref| = {err:.3g} > {tol}"
  got_w = None
  if weights is not None:
    got_w = np.asarray(weights, np.float64)
    assert np.all(np.isfinite(got_w))
    err_w = np.max(np.abs(got_w - ref_w))
    assert err_w <= tol, f"weights: max |layer - ref| = {err_w:.3g} > {tol}"
  return dict(out=got, ref=ref_out, weights=got_w, ref_weights=ref_w, params=params, model=model,
              dtype=dtype)


# ---- the reference checks itself ----------------------------------------------------


SELF_CHECK_CASES = {
    "split_llama31_partial_sliding": dict(
        fused_qkv=False, share_kv=False, attention_type="local_sliding", window=2,
        rope=dict(type="llama3.1", partial_rotary_factor=0.5, original_max_position_embeddings=160,
                  factor=8.0)),
    "fused_yarn_chunk": dict(
        fused_qkv=True, share_kv=False, attention_type="chunk", chunk=2,
        rope=dict(type="yarn", factor=4.0, original_max_position_embeddings=160)),
    "shared_default_global": dict(
        fused_qkv=False, share_kv=True, attention_type="global", rope=dict(type="default")),
    "split_norope_full": dict(
        fused_qkv=False, share_kv=False, attention_type="full", rope=dict(type="none")),
    "split_norope_l2_temperature": dict(
        fused_qkv=False, share_kv=False, attention_type="global", rope=dict(type="none"),
        qk_norm_type="l2", temperature=(0.3, 2.0)),
    "split_l2_yarn": dict(  # YaRN scales cos/sin: the L2 norm must come after RoPE
        fused_qkv=False, share_kv=False, attention_type="global", qk_norm_type="l2",
        rope=dict(type="yarn", factor=4.0, original_max_position_embeddings=160)),
    "fused_layernorm_default": dict(
        fused_qkv=True, share_kv=False, attention_type="global", rope=dict(type="default"),
        qk_norm_type="layernorm"),
}


def _random_params(rng, d, dkv, n, k, h, dout, fused, share_kv):
  g = n // k
  p = {"out.kernel": rng.normal(size=(n, h, dout)) / math.sqrt(n * h), "out.bias": rng.normal(size=dout),
       "query_norm.scale": 1 + 0.5 * rng.normal(size=h), "key_norm.scale": 1 + 0.5 * rng.normal(size=h)}
  if fused:
    p["qkv_proj.kernel"] = rng.normal(size=(d, k, g + 2, h)) / math.sqrt(d)
    p["qkv_proj.bias"] = rng.normal(size=(k, g + 2, h))
  else:
    p["query.kernel"] = rng.normal(size=(d, n, h)) / math.sqrt(d)
    p["query.bias"] = rng.normal(size=(n, h))
    p["key.kernel"] = rng.normal(size=(dkv, k, h)) / math.sqrt(dkv)
    p["key.bias"] = rng.normal(size=(k, h))
    if not share_kv:
      p["value.kernel"] = rng.normal(size=(dkv, k, h)) / math.sqrt(dkv)
      p["value.bias"] = rng.normal(size=(k, h))
  return p


@pytest.mark.parametrize("case", sorted(SELF_CHECK_CASES))
def test_reference_matches_naive_loops(case):
  """The vectorised reference == scalar loops (all features on, tiny sizes)."""
  c = SELF_CHECK_CASES[case]
  rng = np.random.default_rng(1)
  b, t, d, n, k, h = 2, 5, 6, 4, 2, 4
  cross = case.startswith("shared")
  s, dkv = (7, 5) if cross else (t, d)
  params = _random_params(rng, d, dkv, n, k, h, 3, c["fused_qkv"], c["share_kv"])
  x_q = rng.normal(size=(b, t, d))
  x_kv = rng.normal(size=(b, s, dkv)) if cross else None
  q_pos = np.array([[0, 1, 2, 0, 1], [3, 5, 9, 10, 0]])
  kv_pos = rng.integers(0, 12, size=(b, s)) if cross else q_pos
  q_seg = np.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]])
  kv_seg = np.array([[1, 1, 2, 2, 2, 1, 0], [1, 1, 1, 1, 1, 0, 1]]) if cross else q_seg
  mask = rng.random((b, n, t, s)) < 0.8
  mask[0, 1, 2] = False  # a row with nothing visible
  bias = rng.normal(size=(1, n, t, s))
  kw = dict(num_query_heads=n, num_kv_heads=k, head_dim=h, q_positions=q_pos, kv_positions=kv_pos,
            segment_ids=(q_seg, kv_seg), attention_type=c["attention_type"],
            window=c.get("window"), chunk=c.get("chunk"), soft_cap=1.5, scale=0.37,
            use_qk_norm=True, qk_norm_type=c.get("qk_norm_type", "rms"),
            temperature=c.get("temperature"), eps=1e-6, rope=c["rope"], fused_qkv=c["fused_qkv"],
            share_kv=c["share_kv"], use_bias=True, sinks=rng.normal(size=n), mask=mask, bias=bias)
  out, w = attention_layer_np(params, x_q, x_kv, **kw)
  out_n, w_n = attention_layer_naive(params, x_q, x_kv, **kw)
  np.testing.assert_allclose(w, w_n, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(out, out_n, rtol=1e-12, atol=1e-12)
  assert np.all(w[0, 1, 2] == 0)
  # Sinks take mass: visible weights sum to < 1 (and to 0 on empty rows).
  sums = w.sum(-1)
  assert np.all(sums < 1.0) and np.any(sums > 0.1)


# ---- heads x attention types --------------------------------------------------------


@pytest.mark.parametrize("attention_type", ["global", "local_sliding", "chunk", "full"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_heads_and_attention_types(kv_heads, attention_type):
  mask = MaskSpec(attention_type, window=3 if attention_type == "local_sliding" else None,
                  chunk=3 if attention_type == "chunk" else None)
  run(layer_kwargs(num_kv_heads=kv_heads, mask=mask))


# ---- single features ------------------------------------------------------------------


FEATURES = {
    "soft_cap": dict(attn_logits_soft_cap=0.7),
    "sinks": dict(attention_sink=True),
    "qk_norm": dict(use_qk_norm=True, normalization_layer_epsilon=1e-3),
    "qk_norm_l2": dict(use_qk_norm=True, qk_norm_type="l2"),
    # YaRN's attention factor scales q and k: after RoPE, the L2 norm removes it.
    "qk_norm_l2_yarn": dict(use_qk_norm=True, qk_norm_type="l2",
                            rope=RopeSpec("yarn", factor=4.0, original_max_position_embeddings=160,
                                          attention_factor=1.5)),
    "qk_norm_layernorm": dict(use_qk_norm=True, qk_norm_type="layernorm",
                              normalization_layer_epsilon=1e-3),
    "bias": dict(use_bias=True),
    "fused": dict(fused_qkv=True),
    "fused_bias": dict(fused_qkv=True, use_bias=True),
    "shared_kv": dict(share_kv_projections=True),
    "shared_kv_bias": dict(share_kv_projections=True, use_bias=True),
    "query_pre_attn_scalar": dict(query_pre_attn_scalar=3.0),
    "qkv_features": dict(qkv_features=48),  # head_dim 12
    "out_features": dict(out_features=20),
    "qkv_and_out_features": dict(qkv_features=16, out_features=40, num_kv_heads=1),
    "head_dim_not_emb_over_heads": dict(head_dim=12),
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_single_feature(feature):
  kw = layer_kwargs(**FEATURES[feature])
  res = run(kw, mask=None)
  if feature == "qkv_features":
    assert res["model"].settings.head_dim == 12
  if feature == "out_features":
    assert res["out"].shape == (B, T, 20)


def test_soft_cap_bites():
  """With a small cap the capped logits are far from the uncapped ones, so the
  feature test above really exercises the cap (guards the test's own power)."""
  res = run(layer_kwargs(attn_logits_soft_cap=0.7))
  nocap = run(layer_kwargs(), seed=0)
  assert np.max(np.abs(res["out"] - nocap["out"])) > 1e-2 * np.max(np.abs(nocap["out"]))


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("projection", ["fused", "shared_kv"])
def test_everything_at_once(kv_heads, projection):
  pos, seg = packed()
  kw = layer_kwargs(
      num_kv_heads=kv_heads, mask=MaskSpec("local_sliding", window=3),
      rope=RopeSpec("yarn", factor=4.0, original_max_position_embeddings=160),
      attn_logits_soft_cap=2.0, attention_sink=True, use_qk_norm=True, use_bias=True,
      fused_qkv=projection == "fused", share_kv_projections=projection == "shared_kv",
      query_pre_attn_scalar=5.0)
  res = run(kw, positions=pos, segments=seg)
  _check_padding(res, seg)


# ---- RoPE ------------------------------------------------------------------------------


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


def _check_padding(res, seg):
  """Padding tokens (segment 0): zero weights, context zero, so the output is
  exactly the output bias in the compute dtype (or exactly 0 without bias)."""
  pad = np.asarray(seg) == 0
  assert pad.any()
  if res["weights"] is not None:
    assert np.all(np.moveaxis(res["weights"], -3, -2)[pad] == 0)
  bias = res["params"].get("out.bias")
  want = np.zeros(res["out"].shape[-1]) if bias is None else bias
  want = np.asarray(jnp.asarray(want, res["dtype"]), np.float64)
  assert np.all(res["out"][pad] == want), res["out"][pad] - want


@pytest.mark.parametrize("rope,partial", [(r, p) for r in sorted(ROPES) for p in (1.0, 0.5)
                                          if r != "none" or p == 1.0])
def test_rope_types_packed(rope, partial):
  spec = dataclasses.replace(ROPES[rope], partial_rotary_factor=partial)
  pos, seg = packed()
  res = run(layer_kwargs(rope=spec, use_bias=True, use_qk_norm=True, attention_sink=True),
            positions=pos, segments=seg)
  _check_padding(res, seg)


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
  _check_padding(res, seg)


def test_all_padding_row_is_finite():
  seg = np.zeros((B, T), np.int32)
  seg[0, :3] = 1
  res = run(layer_kwargs(use_bias=True), segments=seg)
  _check_padding(res, seg)
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
  _check_padding(res, q_seg)


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
  _check_padding(res, seg)


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
  _check_padding(res, seg)


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
  _check_padding(res, seg)


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
