"""cuDNN flash attention (through `jax.nn.dot_product_attention`) behind the reference signature.

`cudnn_attention` takes what `dot_product_attention` takes and returns the
same numbers where it accepts the inputs; everything else raises ValueError
naming the feature (the names of `CUDNN_FEATURES`), before any GPU work.

What jax.nn.dot_product_attention(implementation="cudnn") offers, and how the
reference maps onto it:
  * scale, bias (added after scaling, like the reference), a boolean mask
    (True = attend; cuDNN turns it into a large negative bias), is_causal,
    a left-only sliding window: local_window_size=(window-1, 0) is the
    reference's "t sees t-window+1 .. t".
  * GQA / MQA: K < N key heads are taken directly (query head n uses kv head
    n // G, the reference layout), never repeated.
  * The gradient is cuDNN's fused backward.
What it does not offer, hence refused: chunked masks, logit soft cap, sinks,
score_mod / mask_mod (no logits hook), dropout (not exposed by jax.nn), the
attention weights, and segment ids (jax.nn only takes per-example lengths,
which describe right padding, not packed segments; a packing mask as a dense
`mask` would cost [B, T, S] memory, which the caller can choose explicitly).

Positions must be the token indices (train mode): cuDNN's causal and window
masks are index based. A query whose user mask hides every key gets zeros, as
in the reference (cuDNN alone would average the values). Keys the mask hides
from every query may hold NaN / inf: they (and such queries) are zeroed first.
cuDNN runs float16 / bfloat16 only, head_dim a multiple of 8 up to 256 on
Hopper (128 before; CUDNN_LIMITS); other inputs raise ValueError.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from meshattn.layers.kernels import registry
from meshattn.layers.kernels.api import TrainCall, train_kernel
from meshattn.layers.kernels.shared.gpu_probe import causal_attention_runs, gpu_probe_passes
from meshattn.layers.kernels.shared.online_softmax import hide
from meshattn.layers.masks import structural_mask

CUDNN_FEATURES = frozenset({
    "gqa", "causal", "full", "window", "user_mask", "user_bias", "backward"})


def _cudnn_fits(request: registry.Request) -> str | None:
  capability = registry.gpu_capability()
  if request.head_dim and request.head_dim > 128 and capability is not None and capability < 9.0:
    return f"head_dim {request.head_dim} (<= 128 before Hopper; this GPU: sm {capability})"
  return None


CUDNN_LIMITS = registry.Limits(
    registry.GPU, max_head_dim=256, head_dim_multiple=8, dtypes=registry.HALF_DTYPES,
    fits=_cudnn_fits, why="cuDNN's fused attention (jax.nn.dot_product_attention)")


@functools.cache
def cudnn_available() -> bool:
  """Whether a GPU backend is present and a tiny cuDNN attention compiles and runs (cached)."""
  return gpu_probe_passes(causal_attention_runs(
      functools.partial(jax.nn.dot_product_attention, implementation="cudnn")))


def _to_bnts(x: jax.Array, q_len: int, kv_len: int, name: str) -> jax.Array:
  """A mask/bias broadcastable to [B, N, T, S] -> 4-D with full T and S (cuDNN needs them)."""
  if x.ndim > 4:
    raise ValueError(f"{name} must be broadcastable to [batch, heads, q_len, kv_len], "
                     f"got shape {x.shape}")
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)  # [b, n, t, s]
  return jnp.broadcast_to(x, x.shape[:2] + (q_len, kv_len))  # [b, n, T, S]


# cuDNN takes only fp16/bf16 inputs: no float32. Ranked first for training (docs/benchmarks.md);
# whether it is available is looked up when asked.
@registry.train_variant("flash", registry.GPU, CUDNN_FEATURES, "cuDNN", rank=2,
                        limits=CUDNN_LIMITS, available=lambda: cudnn_available())
@train_kernel("cudnn_attention", CUDNN_FEATURES, index_masked=True, no_empty_rows=True,
              half_precision=True)
def cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    call: TrainCall) -> tuple[jax.Array, None]:
  """cuDNN attention of query [B, T, N, H] over key/value [B, S, K, H].

  Same arguments and results as `dot_product_attention` (weights are always
  None); see the module docstring for what is refused and why.
  """
  batch, q_len, num_heads, _ = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  shape = registry.Request("gpu", "train", frozenset(), head_dim=query.shape[-1], dtype=query.dtype)
  if CUDNN_LIMITS.violations(shape):
    raise ValueError("cudnn_attention cannot run " + "; ".join(CUDNN_LIMITS.violations(shape)))

  spec = call.options.mask
  window = (spec.window - 1, 0) if spec.window else None
  mask4 = None if call.mask is None else _to_bnts(call.mask.astype(bool), q_len, kv_len, "mask")
  bias4 = None if call.bias is None else _to_bnts(call.bias.astype(query.dtype), q_len, kv_len, "bias")
  if mask4 is not None:
    # cuDNN turns the mask into a large negative bias: a hidden key's NaN K makes the logit NaN,
    # and its p = 0 still multiplies V (0 * NaN), as a hidden query's q meets dLogits = 0 in dK.
    # The keys no query sees and the queries that see nothing are zeroed by a select first.
    allowed = structural_mask(spec, call.q_positions, call.kv_positions)[:, None] & mask4  # [B, n, T, S]
    keep = allowed.any(axis=-1).transpose(0, 2, 1)[..., None]  # [B, T, n, 1]
    seen = allowed.any(axis=(1, 2))[:, :, None, None]  # [B, S, 1, 1]
    query = hide(query, keep)
    key, value = hide(key, seen), hide(value, seen)
  context = jax.nn.dot_product_attention(
      query, key, value, bias=bias4, mask=mask4, scale=call.options.scale,
      is_causal=spec.is_causal, local_window_size=window,
      implementation="cudnn")  # [B, T, N, H]
  if mask4 is not None:
    # A row whose user mask hides every visible key is zero in the reference (cuDNN alone
    # would average the values); this also zeroes its cotangent before cuDNN's backward.
    context = hide(context, keep)
  return context, None
