"""An independent float64 NumPy implementation of the whole attention layer.

Written from the math (projections, QK RMSNorm, RoPE variants, masked softmax
with sinks, output projection), not from the JAX code, and deliberately free
of any `meshattn` import, so that the layer's tests compare against something
that cannot share its bugs.

Two implementations live here:

* `attention_layer_np`: vectorised (einsum), used by the layer tests.
* `attention_layer_naive` (tests/helpers/naive_reference.py): explicit Python
  loops over every (b, n, t, s) and scalar `math` for the RoPE frequencies;
  slow, only for a tiny self-check of the vectorised one.

Parameter names follow the layer's `nnx.state(model, nnx.Param)` paths joined
with dots: `query.kernel` [D, N, H], `key.kernel` / `value.kernel` [Dkv, K, H],
`out.kernel` [N, H, Dout], biases `query.bias` [N, H], `key.bias` /
`value.bias` [K, H], `out.bias` [Dout]; fused: `qkv_proj.kernel` [D, K, G+2, H]
and `qkv_proj.bias` [K, G+2, H] (per kv head k: entries 0..G-1 are the queries
of heads k*G+g, entry G the key, entry G+1 the value); `query_norm.scale` /
`key_norm.scale` [H]; `sinks` [N].
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from helpers.packed_np import packed_chunk_visible, packed_chunks, packed_or_token_index

ATTENTION_TYPES = ("global", "local_sliding", "chunk", "full")
ROPE_TYPES = ("default", "llama3.1", "yarn", "none")

ROPE_DEFAULTS: dict = dict(
    type="default", min_timescale=1.0, max_timescale=10_000.0, partial_rotary_factor=1.0,
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8192, beta_fast=32.0, beta_slow=1.0, attention_factor=0.0,
    mrope_section=())


def _rope_settings(rope: Mapping | None) -> dict:
  r = {**ROPE_DEFAULTS, **(rope or {})}
  if r["type"] not in ROPE_TYPES:
    raise ValueError(f"rope type {r['type']!r}")
  return r


# ---- RoPE -----------------------------------------------------------------------


def rope_frequencies(rope: Mapping | None, head_dim: int) -> tuple[np.ndarray, float, int]:
  """(inv_freq [R/2] float64, cos/sin multiplier, R = rotated width)."""
  r = _rope_settings(rope)
  rot = int(head_dim * r["partial_rotary_factor"])
  assert rot > 0 and rot % 2 == 0, rot
  i = np.arange(rot // 2, dtype=np.float64)
  lo, hi = float(r["min_timescale"]), float(r["max_timescale"])
  timescale = lo * (hi / lo) ** (2.0 * i / rot)
  inv = 1.0 / timescale
  multiplier = 1.0
  if r["type"] == "llama3.1":
    big_l = r["original_max_position_embeddings"]
    low, high, factor = r["low_freq_factor"], r["high_freq_factor"], r["factor"]
    wavelen = 2.0 * np.pi / inv
    with np.errstate(divide="ignore", invalid="ignore"):  # low == high (Llama 4): never blended
      smooth = (big_l / wavelen - low) / (high - low)
    blended = (1.0 - smooth) * inv / factor + smooth * inv
    short = wavelen < big_l / high  # high frequency: untouched
    long_ = wavelen > big_l / low  # low frequency: interpolated by `factor`
    inv = np.where(short, inv, np.where(long_, inv / factor, blended))
  elif r["type"] == "yarn":
    base = hi / lo
    big_l = r["original_max_position_embeddings"]

    def corr(rotations):
      return rot * math.log(big_l / (rotations * 2.0 * math.pi)) / (2.0 * math.log(base))

    low = max(math.floor(corr(r["beta_fast"])), 0)
    high = min(math.ceil(corr(r["beta_slow"])), rot - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((i - low) / (high - low), 0.0, 1.0)
    extrap = 1.0 - ramp
    inv = inv / r["factor"] * (1.0 - extrap) + inv * extrap
    multiplier = r["attention_factor"] or (0.1 * math.log(r["factor"]) + 1.0)
  return inv, multiplier, rot


def mrope_streams_np(sections) -> np.ndarray:
  """[R/2]: the position stream each rotated frequency follows under MRoPE."""
  return np.concatenate([np.full(n, j) for j, n in enumerate(sections)]).astype(int)


def apply_rope_np(x: np.ndarray, positions: np.ndarray, rope: Mapping | None) -> np.ndarray:
  """Rotate-half RoPE of x [B, L, heads, H] at positions [B, L], or MRoPE streams [n, B, L]
  (frequency i rotates by the stream of its mrope_section)."""
  r = _rope_settings(rope)
  if r["type"] == "none":
    return x
  inv, multiplier, rot = rope_frequencies(r, x.shape[-1])
  half = rot // 2
  pos = np.asarray(positions, np.float64)
  if pos.ndim == 3:
    pos = np.moveaxis(pos[mrope_streams_np(r["mrope_section"])], 0, -1)  # [B, L, R/2]
  else:
    pos = pos[..., None]  # [B, L, 1]
  angle = pos[:, :, None, :] * inv  # [B, L, 1, R/2]
  cos, sin = np.cos(angle) * multiplier, np.sin(angle) * multiplier
  x1, x2 = x[..., :half], x[..., half:rot]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], axis=-1)


def rms_norm_np(x: np.ndarray, scale: np.ndarray, eps: float) -> np.ndarray:
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def qk_norm_np(x: np.ndarray, scale: np.ndarray | None, eps: float, kind: str) -> np.ndarray:
  """The QK norm over the last axis: rms (with scale), l2 (no scale), layernorm (scale, no
  bias)."""
  if kind == "rms":
    return rms_norm_np(x, scale, eps)
  if kind == "l2":
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
  assert kind == "layernorm", kind
  c = x - x.mean(axis=-1, keepdims=True)
  return c / np.sqrt(np.mean(c * c, axis=-1, keepdims=True) + eps) * scale


def temperature_scales_np(positions: np.ndarray, scale: float, floor_scale: float) -> np.ndarray:
  """Llama 4's query scales at integer positions: log(floor((p + 1) / floor_scale) + 1) * scale
  + 1."""
  return np.log(np.floor((np.asarray(positions, np.float64) + 1) / floor_scale) + 1) * scale + 1


# ---- masks --------------------------------------------------------------------


def structural_visible_np(attention_type: str, q_len: int, kv_len: int, *, window=None,
                          chunk=None) -> np.ndarray:
  """[T, S] boolean on token index t (query) and s (key)."""
  t = np.arange(q_len)[:, None]
  s = np.arange(kv_len)[None, :]
  if attention_type == "full":
    return np.ones((q_len, kv_len), bool)
  causal = s <= t
  if attention_type == "global":
    return causal
  if attention_type == "local_sliding":
    return causal & (t - s < window)
  if attention_type == "chunk":
    return causal & (t // chunk == s // chunk)
  raise ValueError(attention_type)


def _visible(batch, num_heads, q_len, kv_len, attention_type, window, chunk, segment_ids, mask):
  vis = np.broadcast_to(
      structural_visible_np(attention_type, q_len, kv_len, window=window, chunk=chunk),
      (batch, num_heads, q_len, kv_len))
  if packed_chunks(attention_type, segment_ids):
    vis = np.broadcast_to(packed_chunk_visible(segment_ids[0], chunk)[:, None], vis.shape)
  if segment_ids is not None:
    q_seg, kv_seg = (np.asarray(a) for a in segment_ids)
    same = (q_seg[:, :, None] == kv_seg[:, None, :]) & (q_seg[:, :, None] != 0)  # [B, T, S]
    vis = vis & same[:, None]
  if mask is not None:
    vis = vis & np.broadcast_to(np.asarray(mask, bool), vis.shape)
  return vis


# ---- the layer ------------------------------------------------------------------


def attention_layer_np(
    params: Mapping[str, np.ndarray],
    x_q: np.ndarray,
    x_kv: np.ndarray | None = None,
    *,
    num_query_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_positions: np.ndarray,
    kv_positions: np.ndarray | None = None,
    segment_ids: tuple[np.ndarray, np.ndarray] | None = None,
    attention_type: str = "global",
    window: int | None = None,
    chunk: int | None = None,
    soft_cap: float | None = None,
    scale: float,
    use_qk_norm: bool = False,
    qk_norm_type: str = "rms",
    eps: float = 1e-6,
    rope: Mapping | None = None,
    temperature: tuple[float, float] | None = None,
    fused_qkv: bool = False,
    share_kv: bool = False,
    use_bias: bool = False,
    sinks: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    dense=None,
) -> tuple[np.ndarray, np.ndarray]:
  """(out [B, T, Dout], weights [B, N, T, S]) in float64. See the module docstring.

  dense(x, kernel, n_in) computes each projection (default: a float64
  tensordot over x's last n_in axes; `int8_dense_np` for quantization="int8").
  """
  dense = dense or (lambda x, kernel, n_in: np.tensordot(x, kernel, axes=n_in))
  f64 = lambda a: None if a is None else np.asarray(a, np.float64)
  p = {name: f64(value) for name, value in params.items()}
  x_q = f64(x_q)
  x_kv = x_q if x_kv is None else f64(x_kv)
  n_heads, kv_heads, h = num_query_heads, num_kv_heads, head_dim
  assert n_heads % kv_heads == 0
  group = n_heads // kv_heads
  batch, q_len = x_q.shape[:2]
  kv_len = x_kv.shape[1]
  if kv_positions is None:
    kv_positions = q_positions

  def maybe_bias(y, name):
    return y + p[name] if use_bias else y

  if fused_qkv:
    qkv = maybe_bias(dense(x_q, p["qkv_proj.kernel"], 1), "qkv_proj.bias")  # [B, T, K, G+2, H]
    q = np.empty((batch, q_len, n_heads, h))
    for n in range(n_heads):
      q[:, :, n] = qkv[:, :, n // group, n % group]
    k = qkv[:, :, :, group]
    v = qkv[:, :, :, group + 1]
  else:
    q = maybe_bias(dense(x_q, p["query.kernel"], 1), "query.bias")  # [B, T, N, H]
    k = maybe_bias(dense(x_kv, p["key.kernel"], 1), "key.bias")  # [B, S, K, H]
    v = k if share_kv else maybe_bias(dense(x_kv, p["value.kernel"], 1), "value.bias")

  after_rope = qk_norm_type == "l2"  # Llama 4's order; rms / layernorm come first
  if use_qk_norm and not after_rope:
    q = qk_norm_np(q, p.get("query_norm.scale"), eps, qk_norm_type)
    k = qk_norm_np(k, p.get("key_norm.scale"), eps, qk_norm_type)
  q = apply_rope_np(q, q_positions, rope)
  k = apply_rope_np(k, kv_positions, rope)
  if use_qk_norm and after_rope:
    q = qk_norm_np(q, None, eps, qk_norm_type)
    k = qk_norm_np(k, None, eps, qk_norm_type)
  if temperature is not None:  # (scale, floor_scale), on the queries
    q = q * temperature_scales_np(q_positions, *temperature)[:, :, None, None]

  vis = _visible(batch, n_heads, q_len, kv_len, attention_type, window, chunk, segment_ids, mask)
  context, weights = attention_core_np(q, k, v, scale=scale, visible=vis, soft_cap=soft_cap,
                                       sinks=sinks, bias=bias)
  out = dense(context, p["out.kernel"], 2)  # [B, T, Dout]
  out = maybe_bias(out, "out.bias")
  return out, weights


def attention_core_np(q: np.ndarray, k: np.ndarray, v: np.ndarray, *, scale: float,
                      visible: np.ndarray, soft_cap: float | None = None,
                      sinks: np.ndarray | None = None,
                      bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """q [B, T, N, H] over k, v [B, S, K, H] (query head n reads kv head n // (N/K)).

  visible: boolean broadcastable to [B, N, T, S]; bias: float, same.
  Returns (context [B, T, N, H], weights [B, N, T, S]) in float64.
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  n_heads, kv_heads = q.shape[2], k.shape[2]
  assert n_heads % kv_heads == 0
  kv_of_head = np.arange(n_heads) // (n_heads // kv_heads)
  k_n, v_n = k[:, :, kv_of_head], v[:, :, kv_of_head]  # [B, S, N, H]
  logits = scale * np.einsum("btnh,bsnh->bnts", q, k_n)  # [B, N, T, S]
  if bias is not None:
    logits = logits + np.broadcast_to(np.asarray(bias, np.float64), logits.shape)
  if soft_cap:
    logits = soft_cap * np.tanh(logits / soft_cap)

  vis = np.broadcast_to(np.asarray(visible, bool), logits.shape)
  masked = np.where(vis, logits, -np.inf)
  row_max = masked.max(axis=-1, keepdims=True)  # -inf on rows with nothing visible
  if sinks is not None:
    sink = np.asarray(sinks, np.float64)[None, :, None, None]  # [1, N, 1, 1]
    row_max = np.maximum(row_max, sink)
  safe_max = np.where(np.isfinite(row_max), row_max, 0.0)
  e = np.where(vis, np.exp(np.where(vis, logits, 0.0) - safe_max), 0.0)
  denom = e.sum(axis=-1, keepdims=True)
  if sinks is not None:
    denom = denom + np.exp(sink - safe_max)
  weights = np.where(denom > 0, e / np.where(denom > 0, denom, 1.0), 0.0)  # [B, N, T, S]
  context = np.einsum("bnts,bsnh->btnh", weights, v_n)  # [B, T, N, H]
  return context, weights


def int8_quantize_np(a: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
  """(q, step): symmetric int8 against the absolute maximum over `axes`,
  q = clip(round(a / (amax / 127.5)), -127, 127), so a ~= q * step."""
  a = np.asarray(a, np.float64)
  step = np.abs(a).max(axis=axes, keepdims=True) / 127.5
  step = np.where(step > 0, step, 1.0)
  return np.clip(np.round(a / step), -127, 127), step


def int8_operands_np(x: np.ndarray, kernel: np.ndarray, n_in: int):
  """The dequantized operands of quantization="int8": x per token (its last n_in axes), the
  kernel per output feature (its first n_in axes)."""
  qx, sx = int8_quantize_np(x, tuple(range(x.ndim - n_in, x.ndim)))
  qk, sk = int8_quantize_np(kernel, tuple(range(n_in)))
  return qx * sx, qk * sk


def int8_dense_np(x: np.ndarray, kernel: np.ndarray, n_in: int) -> np.ndarray:
  """quantization="int8" in float64: x's last n_in axes contracted with kernel's first n_in,
  both operands quantized (`int8_operands_np`)."""
  xq, kq = int8_operands_np(x, kernel, n_in)
  return np.tensordot(xq, kq, axes=n_in)  # [*batch, *out]
