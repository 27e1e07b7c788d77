"""The whole attention layer as explicit Python loops over every (b, n, t, s), with scalar
`math` for the RoPE frequencies: slow, only for a tiny self-check of the vectorised float64
reference in numpy_reference.py (it catches broadcasting / axis-order mistakes there). Same
parameter names and conventions as numpy_reference.py; no `meshattn` import.
"""

from __future__ import annotations

import math

import numpy as np

from helpers.numpy_reference import _rope_settings, mrope_streams_np
from helpers.packed_np import packed_or_token_index


def _inv_freq_scalar(r: dict, i: int, rot: int) -> tuple[float, float]:
  lo, hi = float(r["min_timescale"]), float(r["max_timescale"])
  inv = 1.0 / (lo * (hi / lo) ** (2.0 * i / rot))
  if r["type"] == "llama3.1":
    big_l, factor = r["original_max_position_embeddings"], r["factor"]
    low, high = r["low_freq_factor"], r["high_freq_factor"]
    wavelen = 2.0 * math.pi / inv
    if wavelen < big_l / high:
      pass
    elif wavelen > big_l / low:
      inv = inv / factor
    else:
      smooth = (big_l / wavelen - low) / (high - low)
      inv = (1.0 - smooth) * inv / factor + smooth * inv
    return inv, 1.0
  if r["type"] == "yarn":
    base, big_l = hi / lo, r["original_max_position_embeddings"]
    corr = lambda rr: rot * math.log(big_l / (rr * 2.0 * math.pi)) / (2.0 * math.log(base))
    low = max(math.floor(corr(r["beta_fast"])), 0)
    high = min(math.ceil(corr(r["beta_slow"])), rot - 1)
    if low == high:
      high += 0.001
    ramp = min(max((i - low) / (high - low), 0.0), 1.0)
    inv = inv / r["factor"] * ramp + inv * (1.0 - ramp)
    return inv, r["attention_factor"] or (0.1 * math.log(r["factor"]) + 1.0)
  return inv, 1.0


def _rope_vec(vec, pos, r: dict):
  if r["type"] == "none":
    return list(vec)
  head_dim = len(vec)
  rot = int(head_dim * r["partial_rotary_factor"])
  half = rot // 2
  out = list(vec)
  for i in range(half):
    inv, m = _inv_freq_scalar(r, i, rot)
    # MRoPE: pos holds one position per stream; frequency i follows its section's stream.
    p_i = pos[mrope_streams_np(r["mrope_section"])[i]] if np.ndim(pos) else pos
    a = float(p_i) * inv
    c, s = math.cos(a) * m, math.sin(a) * m
    out[i] = vec[i] * c - vec[i + half] * s
    out[i + half] = vec[i + half] * c + vec[i] * s
  return out


def _pos_at(positions, b, t):
  """The position of token (b, t): a scalar, or the MRoPE streams' [n] positions."""
  positions = np.asarray(positions)
  return positions[b, t] if positions.ndim == 2 else positions[:, b, t]


def attention_layer_naive(params, x_q, x_kv=None, *, num_query_heads, num_kv_heads, head_dim,
                          q_positions, kv_positions=None, segment_ids=None,
                          attention_type="global", window=None, chunk=None, soft_cap=None, scale,
                          use_qk_norm=False, qk_norm_type="rms", eps=1e-6, rope=None,
                          temperature=None, fused_qkv=False, share_kv=False, use_bias=False,
                          sinks=None, mask=None, bias=None):
  """Same contract as `attention_layer_np`, one scalar at a time."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  x_q = np.asarray(x_q, np.float64)
  x_kv = x_q if x_kv is None else np.asarray(x_kv, np.float64)
  kv_positions = q_positions if kv_positions is None else kv_positions
  r = _rope_settings(rope)
  nh, kh, hd = num_query_heads, num_kv_heads, head_dim
  g_size = nh // kh
  b_, t_, d_ = x_q.shape
  s_ = x_kv.shape[1]

  def proj(x_vec, kernel, bias_vec, idx):
    # kernel [D, *idx, H]: one head's vector.
    out = []
    for j in range(hd):
      acc = 0.0
      for d in range(len(x_vec)):
        acc += x_vec[d] * kernel[(d,) + idx + (j,)]
      if use_bias:
        acc += bias_vec[idx + (j,)]
      out.append(acc)
    return out

  def norm(vec, sc):
    if qk_norm_type == "layernorm":
      mean = sum(vec) / len(vec)
      vec = [e - mean for e in vec]
    ms = sum(e * e for e in vec) / len(vec)
    if qk_norm_type == "l2":
      return [e / math.sqrt(ms + eps) for e in vec]
    return [e / math.sqrt(ms + eps) * sc[j] for j, e in enumerate(vec)]

  def q_vec(b, t, n):
    if fused_qkv:
      vec = proj(x_q[b, t], p["qkv_proj.kernel"], p.get("qkv_proj.bias"), (n // g_size, n % g_size))
    else:
      vec = proj(x_q[b, t], p["query.kernel"], p.get("query.bias"), (n,))
    if use_qk_norm and qk_norm_type != "l2":
      vec = norm(vec, p.get("query_norm.scale"))
    vec = _rope_vec(vec, _pos_at(q_positions, b, t), r)
    if use_qk_norm and qk_norm_type == "l2":
      vec = norm(vec, None)
    if temperature is not None:
      scale_t, floor_t = temperature
      pos = float(q_positions[b][t])
      vec = [e * (math.log(math.floor((pos + 1) / floor_t) + 1) * scale_t + 1) for e in vec]
    return vec

  def k_vec(b, s, kk):
    if fused_qkv:
      vec = proj(x_q[b, s], p["qkv_proj.kernel"], p.get("qkv_proj.bias"), (kk, g_size))
    else:
      vec = proj(x_kv[b, s], p["key.kernel"], p.get("key.bias"), (kk,))
    if use_qk_norm and qk_norm_type != "l2":
      vec = norm(vec, p.get("key_norm.scale"))
    vec = _rope_vec(vec, _pos_at(kv_positions, b, s), r)
    if use_qk_norm and qk_norm_type == "l2":
      vec = norm(vec, None)
    return vec

  def v_vec(b, s, kk):
    if fused_qkv:
      return proj(x_q[b, s], p["qkv_proj.kernel"], p.get("qkv_proj.bias"), (kk, g_size + 1))
    if share_kv:
      return proj(x_kv[b, s], p["key.kernel"], p.get("key.bias"), (kk,))
    return proj(x_kv[b, s], p["value.kernel"], p.get("value.bias"), (kk,))

  rel = packed_or_token_index(attention_type, segment_ids, b_, max(t_, s_))

  def visible(b, n, t, s):
    if attention_type != "full":
      if s > t:
        return False
      if attention_type == "local_sliding" and t - s >= window:
        return False
      if attention_type == "chunk" and rel[b][t] // chunk != rel[b][s] // chunk:
        return False
    if segment_ids is not None:
      qs, ks = segment_ids[0][b][t], segment_ids[1][b][s]
      if qs != ks or qs == 0:
        return False
    if mask is not None and not np.broadcast_to(mask, (b_, nh, t_, s_))[b, n, t, s]:
      return False
    return True

  d_out = p["out.kernel"].shape[-1]
  out = np.zeros((b_, t_, d_out))
  weights = np.zeros((b_, nh, t_, s_))
  for b in range(b_):
    ks = [[k_vec(b, s, kk) for kk in range(kh)] for s in range(s_)]
    vs = [[v_vec(b, s, kk) for kk in range(kh)] for s in range(s_)]
    for t in range(t_):
      ctx = np.zeros((nh, hd))
      for n in range(nh):
        qv = q_vec(b, t, n)
        kk = n // g_size
        terms = {}
        for s in range(s_):
          if not visible(b, n, t, s):
            continue
          logit = scale * sum(qv[j] * ks[s][kk][j] for j in range(hd))
          if bias is not None:
            logit += float(np.broadcast_to(bias, (b_, nh, t_, s_))[b, n, t, s])
          if soft_cap:
            logit = soft_cap * math.tanh(logit / soft_cap)
          terms[s] = logit
        extra = [float(sinks[n])] if sinks is not None else []
        everything = list(terms.values()) + extra
        if not terms:
          continue  # nothing visible: zero weights, zero context
        m = max(everything)
        z = sum(math.exp(e - m) for e in everything)
        for s, logit in terms.items():
          w = math.exp(logit - m) / z
          weights[b, n, t, s] = w
          for j in range(hd):
            ctx[n, j] += w * vs[s][kk][j]
      for o in range(d_out):
        acc = p["out.bias"][o] if use_bias else 0.0
        for n in range(nh):
          for j in range(hd):
            acc += ctx[n, j] * p["out.kernel"][n, j, o]
        out[b, t, o] = acc
  return out, weights
