"""Float64 NumPy reference of causal linear attention: the masked quadratic form.

Written from the definition, free of any meshattn import:

    out_t = sum_{s visible to t} gamma_k^(d(t, s)) (phi(q_t) . phi(k_s)) v_s
            [ / the same sum without v_s ]

where s is visible to t when s <= t, both are real tokens (valid, segment
id != 0) and no segment change among real tokens lies between them; d(t, s)
counts the real tokens after s up to t (padding is transparent). Queries see
their own key. Invisible queries output zeros. gamma is per kv head; query
head n uses kv head n // (N / K).
"""

from __future__ import annotations

import numpy as np

FEATURES = {
    "elu_plus_one": lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0))),
    "relu": lambda x: np.maximum(x, 0.0),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "identity": lambda x: x,
}


def visibility_np(valid: np.ndarray, segment_ids: np.ndarray | None):
  """(visible [B, T, T] query t sees key s, distance [B, T, T]) as in the module doc."""
  valid = np.asarray(valid, bool)
  if segment_ids is not None:
    valid = valid & (np.asarray(segment_ids) != 0)
  b, t = valid.shape
  visible = np.zeros((b, t, t), bool)
  distance = np.zeros((b, t, t), np.int64)
  for row in range(b):
    real = [i for i in range(t) if valid[row, i]]
    ids = [0 if segment_ids is None else segment_ids[row, i] for i in real]
    for a, tq in enumerate(real):
      for c in range(a, -1, -1):  # walk back over real tokens until the segment changes
        if c < a and ids[c] != ids[c + 1]:
          break
        visible[row, tq, real[c]] = True
        distance[row, tq, real[c]] = a - c
  return visible, distance


def linear_attention_np(q, k, v, *, feature_map="elu_plus_one", decay=(), normalize=True,
                        scale=1.0, valid=None, segment_ids=None) -> np.ndarray:
  """q [B, T, N, H], k [B, T, K, H], v [B, T, K, V] -> [B, T, N, V] float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, _ = q.shape
  kv_heads = k.shape[2]
  valid = np.ones((b, t), bool) if valid is None else np.asarray(valid, bool)
  visible, distance = visibility_np(valid, segment_ids)
  phi = feature_map if callable(feature_map) else FEATURES[feature_map]  # a callable: NumPy
  gammas = (np.ones(kv_heads) if not decay else
            np.asarray(tuple(decay) * kv_heads if len(decay) == 1 else decay, np.float64))
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  for head in range(n):
    kv = head // (n // kv_heads)
    fq = phi(np.where(valid[..., None], q[:, :, head], 0.0)) * scale  # [B, T, H]
    fk = phi(np.where(valid[..., None], k[:, :, kv], 0.0))  # [B, T, H]
    weights = np.einsum("bth,bsh->bts", fq, fk)
    weights = np.where(visible, weights * gammas[kv] ** np.where(visible, distance, 0), 0.0)
    num = np.einsum("bts,bsv->btv", weights, np.where(valid[..., None], v[:, :, kv], 0.0))
    if normalize:
      den = weights.sum(-1)
      num = num / np.where(den == 0, 1.0, den)[..., None]
    out[:, :, head] = np.where(visible.any(-1)[..., None], num, 0.0)
  return out
