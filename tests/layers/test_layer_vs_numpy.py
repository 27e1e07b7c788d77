"""The Attention layer against the independent float64 NumPy reference (part 1 of 2).

Every feature of the layer (MHA/GQA/MQA, every attention type, soft cap,
sinks, QK norm, biases, fused / shared projections, every RoPE variant with
partial rotary and non-trivial positions, packing with padding, the
query_pre_attn_scalar, cross-attention, extra batch dims, user masks and
biases, qkv_features / out_features) is checked on tiny shapes (RoPE variants, padding, cross-attention, masks,
bfloat16 and gradients: test_layer_inputs_vs_numpy.py) with random
parameters (biases, norm scales and sinks included), comparing both the
output and the sown attention weights.

Tolerances: float32 max |layer - ref| <= 1e-5 * max |ref| (weights: 1e-5
absolute, they are probabilities); bfloat16 compute (float32 weights) 2e-2.
The random parameters keep logits O(1) (kernels ~ N(0, 1/fan_in)), so a wrong
scale, cap, sink or head grouping changes the output at the 1e-1 level, far
above these tolerances.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from helpers.layer_vs_numpy import B, T, check_padding, layer_kwargs, packed, run
from helpers.naive_reference import attention_layer_naive
from helpers.numpy_reference import attention_layer_np
from meshattn.layers import MaskSpec, RopeSpec


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
  check_padding(res, seg)


# ---- RoPE ------------------------------------------------------------------------------
