"""Attention that also returns its log-sum-exp, and the exact merge of two such parts.

A query's softmax over keys A + B can be computed as two separate passes, one
over A and one over B, if each pass also returns the log-sum-exp (LSE) of its
scaled logits: with o_x the normalised output of part x and l_x its LSE,

    m = max(l_a, l_b[, sink]),  w_x = exp(l_x - m)
    o = (o_a w_a + o_b w_b) / (w_a + w_b [+ exp(sink - m)])

is exactly softmax attention over A + B (with an attention sink taking mass
but no value). A part in which a query sees no key has l = -inf, w = 0, so
it contributes nothing, and a row whose other part is empty gets the other
part's output unchanged (w = 1, divided by 1).

A partial kernel's signature (`PartialAttention`):

    fn(query [B, T, N, H], key, value [B, S, K, H], *, q_lengths [B],
       kv_lengths [B], causal: bool, scale: float)
      -> (out [B, T, N, H], lse [B, T, N] float32)

Row b's queries 0..q_lengths[b]-1 attend over its keys 0..kv_lengths[b]-1
(right padding on both sides), causally by index if `causal` (query t sees
keys <= t; callers pass q_lengths == kv_lengths then, where a top-left and a
bottom-right aligned causal mask agree). K < N key heads serve N // K query heads each
(GQA / MQA), never repeated. `lse` is the natural log of the sum of
exp(scale * q.k) over the keys a query sees, -inf where it sees none (a row
with kv_lengths 0), and `out` is then unspecified (the merge selects it
away); out and lse of padding queries are unspecified too (the caller
selects them away). Keys at or past kv_lengths must not hold NaN / inf for
the cuDNN kernel (it multiplies their zero weight by the value): prefill_split
zeroes them where it copies the cache anyway (a gather of rows, a dequantization)
and reads a contiguous cache in place otherwise, where the cache keeps them zero.

Two implementations:
* `reference_partial_attention`: plain XLA, float32 logits and softmax,
  forms the [B, K, G, T, S] logits (for tests and CPU; not for long slots);
* `cudnn_partial_attention`: cuDNN's fused flash attention through JAX's
  private `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention`
  (`return_residual=True` gives the softmax statistics [B, N, T] in float32;
  the public jax.nn wrapper casts them to the activation dtype, which loses
  the precision the merge needs). `cudnn_partial_usable` checks once, on a
  tiny problem on the GPU, that the private API exists, runs, and returns the
  natural-log LSE; anything else (an API change in a later JAX, no GPU, no
  cuDNN) makes it False and callers keep their other path.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from meshattn.layers.kernels.shared.gpu_probe import gpu_probe_passes

logger = logging.getLogger("meshattn.kernels")

PartialAttention = Callable[..., tuple[jax.Array, jax.Array]]

try:  # private API: present in the JAX versions this was written against, may move later
  from jax._src.cudnn import fused_attention_stablehlo as _cudnn_fa
except ImportError:  # pragma: no cover - depends on the installed JAX
  _cudnn_fa = None

_CUDNN_KEYWORDS = ("q_seqlen", "kv_seqlen", "scale", "mask_type", "qkv_layout", "return_residual")


def _visible(t: int, s: int, q_lengths, kv_lengths, causal: bool) -> jax.Array:
  """Which (query, key) pairs a row sees: [B, T, S]."""
  q_idx = jnp.arange(t, dtype=jnp.int32)[None, :, None]  # [1, T, 1]
  k_idx = jnp.arange(s, dtype=jnp.int32)[None, None, :]  # [1, 1, S]
  seen = (q_idx < q_lengths[:, None, None]) & (k_idx < kv_lengths[:, None, None])  # [B, T, S]
  return seen & (k_idx <= q_idx) if causal else seen


def reference_partial_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                                q_lengths: jax.Array, kv_lengths: jax.Array, causal: bool,
                                scale: float, precision=None) -> tuple[jax.Array, jax.Array]:
  """The partial-kernel contract in plain XLA (float32 logits, softmax and output).

  Returns out [B, T, N, H] float32 (zeros where a query sees nothing) and
  lse [B, T, N] float32 (-inf there). Hidden keys / values are selected away,
  never multiplied, so they may hold anything.
  """
  b, t, n, h = query.shape
  s, k = key.shape[1], key.shape[2]
  q = query.reshape(b, t, k, n // k, h)  # [B, T, K, G, H]
  seen = _visible(t, s, q_lengths, kv_lengths, causal)[:, None, None]  # [B, 1, 1, T, S]
  live_k = jnp.any(seen, axis=(1, 2, 3))[:, :, None, None]  # [B, S, 1, 1]
  key = jnp.where(live_k, key, jnp.zeros((), key.dtype))  # [B, S, K, H]
  value = jnp.where(live_k, value, jnp.zeros((), value.dtype))  # [B, S, K, H]
  logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, key, precision=precision,
                      preferred_element_type=jnp.float32) * scale  # [B, K, G, T, S]
  logits = jnp.where(seen, logits, -jnp.inf)
  peak = jnp.max(logits, axis=-1)  # [B, K, G, T]
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  p = jnp.where(seen, jnp.exp(logits - peak[..., None]), 0.0)  # [B, K, G, T, S]
  total = jnp.sum(p, axis=-1)  # [B, K, G, T]
  out = jnp.einsum("BKGTS,BSKH->BTKGH", p, value.astype(jnp.float32), precision=precision)
  # `!= 0`, not `> 0`: a NaN that reached a visible key stays NaN (never "nothing seen").
  norm = jnp.where(total != 0, total, 1.0)  # [B, K, G, T]
  out = out / jnp.moveaxis(norm, 3, 1)[..., None]  # [B, T, K, G, H]
  lse = jnp.where(total != 0, peak + jnp.log(norm), -jnp.inf)  # [B, K, G, T]
  return out.reshape(b, t, n, h), jnp.moveaxis(lse, 3, 1).reshape(b, t, n)


def cudnn_partial_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                            q_lengths: jax.Array, kv_lengths: jax.Array, causal: bool,
                            scale: float) -> tuple[jax.Array, jax.Array]:
  """The partial-kernel contract through cuDNN (bf16 / fp16, head_dim per CUDNN_LIMITS).

  Padding (and causal) masks come from the lengths, so no dense mask is
  formed. A row with no key (or no query) is run with length 1 and
  its lse set to -inf afterwards (cuDNN's result for an empty row is not
  specified). Returns out [B, T, N, H] in the query dtype, lse [B, T, N]
  float32.
  """
  if _cudnn_fa is None:
    raise NotImplementedError("cuDNN partial attention needs "
                              "jax._src.cudnn.fused_attention_stablehlo (not in this JAX)")
  mask = _cudnn_fa.MaskType.PADDING_CAUSAL if causal else _cudnn_fa.MaskType.PADDING
  q_len = jnp.maximum(q_lengths, 1).astype(jnp.int32)  # [B]
  kv_len = jnp.maximum(kv_lengths, 1).astype(jnp.int32)  # [B]
  out, stats = _cudnn_fa.dot_product_attention(
      query, key, value, q_seqlen=q_len, kv_seqlen=kv_len, scale=scale, mask_type=mask,
      qkv_layout="BTNH", return_residual=True)  # [B, T, N, H], [B, N, T] float32
  lse = jnp.transpose(stats.astype(jnp.float32), (0, 2, 1))  # [B, T, N]
  empty = (kv_lengths <= 0) | (q_lengths <= 0)  # [B]
  return out, jnp.where(empty[:, None, None], -jnp.inf, lse)


@functools.cache
def cudnn_partial_usable() -> bool:
  """Whether `cudnn_partial_attention` runs here and returns the natural-log LSE (cached).

  Runs the two problems the split path asks on the GPU (GQA: a padded causal
  pass with equal query / key lengths, and a padded non-causal one with other
  key lengths) against the reference; False without a GPU, without the private API (or with a changed
  signature), or if its results disagree (logged).
  """
  if _cudnn_fa is None:
    return False
  try:
    params = inspect.signature(_cudnn_fa.dot_product_attention).parameters
  except (TypeError, ValueError):
    return False
  if any(name not in params for name in _CUDNN_KEYWORDS):
    logger.warning("cuDNN partial attention: the private API lacks some of %s; the split "
                   "prefill path is off", _CUDNN_KEYWORDS)
    return False
  # Run now even if first asked while a step is traced, on this process's own GPU
  # (shared/gpu_probe: every process must reach the same answer).
  return gpu_probe_passes(
      _check_against_reference,
      warning="cuDNN partial attention failed its check here (%s: %s); the split prefill "
              "path is off")


def _check_against_reference(device) -> bool:
  """cuDNN vs the reference on the problems the split asks (see cudnn_partial_usable)."""
  rng = np.random.default_rng(0)
  q, k, v = (jax.device_put(jnp.asarray(rng.standard_normal(shape), jnp.bfloat16), device)
             for shape in ((2, 128, 4, 64), (2, 128, 2, 64), (2, 128, 2, 64)))
  q_lengths = jnp.array([100, 128], jnp.int32)
  real = np.arange(128)[None, :, None] < np.asarray(q_lengths)[:, None, None]  # [B, T, 1]
  out_err = lse_err = 0.0
  for kv_lengths, causal in ((q_lengths, True), (jnp.array([128, 70], jnp.int32), False)):
    kw = dict(q_lengths=q_lengths, kv_lengths=kv_lengths, causal=causal, scale=0.125)
    got = jax.jit(functools.partial(cudnn_partial_attention, **kw))(q, k, v)
    want = jax.jit(functools.partial(reference_partial_attention, **kw))(q, k, v)
    out_err = max(out_err, float(np.max(np.abs(np.where(real[..., None], got[0] - want[0], 0)))))
    lse_err = max(lse_err, float(np.max(np.abs(np.where(real, got[1] - want[1], 0)))))
  if out_err > 2e-2 or lse_err > 2e-2:
    logger.warning("cuDNN partial attention disagrees with the reference (out %.3g, lse %.3g): "
                   "not used", out_err, lse_err)
    return False
  return True


def merge_partials(out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array, lse_b: jax.Array,
                   sinks: jax.Array | None = None) -> jax.Array:
  """Softmax attention over keys A + B from its parts: out [B, T, N, H], lse [B, T, N].

  Exact (module docstring), accumulated in float32; sinks [N] are logits that
  join the denominator only. Weights are selected, never multiplied by a
  zero, so an empty part's unspecified output cannot leak. Returns float32
  [B, T, N, H]; a query that sees nothing (and no sink) gives zeros.
  """
  peak = jnp.maximum(lse_a, lse_b)  # [B, T, N]
  if sinks is not None:
    sink = jnp.broadcast_to(sinks.astype(jnp.float32), peak.shape)  # [B, T, N]
    peak = jnp.maximum(peak, sink)
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  w_a = jnp.exp(lse_a - peak)  # [B, T, N], 0 where lse_a = -inf
  w_b = jnp.exp(lse_b - peak)
  total = w_a + w_b + (jnp.exp(sink - peak) if sinks is not None else 0.0)  # [B, T, N]
  # A part with no visible key (w == 0) is dropped whatever its output holds; a NaN weight
  # (a NaN reached a visible key) is kept, so the NaN shows.
  part_a = jnp.where((w_a != 0)[..., None], out_a.astype(jnp.float32) * w_a[..., None], 0.0)
  part_b = jnp.where((w_b != 0)[..., None], out_b.astype(jnp.float32) * w_b[..., None], 0.0)
  norm = jnp.where(total != 0, total, 1.0)[..., None]  # [B, T, N, 1]
  return (part_a + part_b) / norm  # [B, T, N, H]
