"""Run the Attention layer and the float64 NumPy reference on the same random parameters and
inputs, and compare (tests/layers/test_layer_vs_numpy.py, test_layer_inputs_vs_numpy.py).

Tolerances: float32 max |layer - ref| <= 1e-5 * max |ref| (weights: 1e-5
absolute, they are probabilities); bfloat16 compute (float32 weights) 2e-2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helpers.layer_params import randomize, ref_settings
from helpers.numpy_reference import attention_layer_np
from meshattn.layers import Attention

B, T, D, N, H = 2, 8, 32, 4, 8
F32_TOL = 1e-5
BF16_TOL = 2e-2

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


def check_padding(res, seg):
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
