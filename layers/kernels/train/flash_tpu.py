"""Splash attention (JAX's Pallas TPU flash kernel) behind the reference signature.

`splash_attention` takes exactly what `dot_product_attention` takes, so the
layer can swap kernels, and it returns the same numbers wherever it accepts
the inputs. Anything splash cannot express raises ValueError naming the
feature (the names of `SPLASH_FEATURES`) instead of silently differing.

What the reference does and how it maps onto splash:
  * scale: splash never scales the logits, so the query is pre-scaled.
  * soft cap: splash's `attn_logits_soft_cap` caps (q*scale).k, the same
    order as the reference (scale, then cap, then mask).
  * sinks: splash's per-query-head `sinks` enter the softmax denominator only,
    like the reference's extra sink column.
  * structural mask: splash masks are static and index based (CausalMask,
    LocalMask, ChunkedCausalMask, FullMask), so positions must be the token
    indices 0..T-1 / 0..S-1 (train mode). Concrete positions are checked;
    traced ones are trusted (the layer passes aranges in train mode).
  * GQA / MQA: splash's MHA kernel indexes kv head h // G for query head h
    (n = k * G + g, the reference layout) so K/V are never repeated; K = 1
    uses the MQA kernel, which takes a single [S, H] key.
  * batch: splash kernels are per example; they are vmapped over B (a
    lax.map in interpret mode, whose TPU interpreter cannot batch a kernel).
  * segment ids: splash attends within equal ids, padding (id 0) included,
    whereas the reference gives padding queries zeros; those rows (and any
    query whose segment has no visible key) are zeroed afterwards. Padding
    may hold NaN / inf, which splash would multiply into p @ V by a zero p:
    the q, k, v of tokens no real token pairs with are zeroed (a select)
    before the call.
The gradient is splash's own (custom_vjp with Pallas backward kernels).

Numerics: splash accumulates q.k and p.v in float32 whatever the input dtype,
so `float32_qk_product` / `float32_logits` are always in effect and
`precision` is not used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from meshattn.layers.kernels.api import TrainCall, train_kernel
from meshattn.layers.kernels.registry import FLOAT32, TPU, Limits, Request, train_variant
from meshattn.layers.kernels.shared.lazy_import import lazy_module
from meshattn.layers.kernels.shared.live_tokens import keys_with_rows, rows_with_keys
from meshattn.layers.masks import MaskSpec

# Imported when a kernel is built (registry discovery imports this module on every host).
pltpu = lazy_module("jax.experimental.pallas.tpu")
splash = lazy_module("jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel")
splash_mask = lazy_module("jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_mask")

# Splash has no bias/mask operand and no hook for arbitrary logits functions
# (its static masks are numpy objects, its mask_function sees only indices
# inside the kernel); it has no dropout and never forms the weights.
SPLASH_FEATURES = frozenset({
    "gqa", "causal", "full", "window", "chunk", "segment_ids", "soft_cap", "sinks", "backward"})

# Splash's kv blocks must be multiples of the 128-lane vreg width.
_LANES = 128


# ---- Splash --------------------------------------------------------------------


def _largest_block(length: int, name: str) -> int:
  for block in (512, 256, _LANES):
    if length % block == 0:
      return block
  raise ValueError(f"splash_attention needs {name} to be a multiple of {_LANES}, got {length} "
                   "(or pass block_sizes)")


def default_block_sizes(q_len: int, kv_len: int) -> splash.BlockSizes:
  """The largest of 512 / 256 / 128 dividing each length, backward blocks included."""
  bq, bkv = _largest_block(q_len, "q_len"), _largest_block(kv_len, "kv_len")
  return splash.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv,
      block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
      block_q_dq=bq, block_kv_dq=bkv)


def _chunked_causal_mask(shape: tuple[int, int], chunk: int) -> splash_mask.Mask:
  """Causal within `chunk`-token chunks; a NumpyMask where splash lacks the lazy one."""
  lazy = getattr(splash_mask, "ChunkedCausalMask", None)
  if lazy is not None:
    return lazy(shape, chunk_size=chunk)
  q = np.arange(shape[0])[:, None]  # [T, 1]
  k = np.arange(shape[1])[None, :]  # [1, S]
  return splash_mask.NumpyMask((k <= q) & (q // chunk == k // chunk))  # [T, S]


def splash_mask_for(spec: MaskSpec, q_len: int, kv_len: int) -> splash_mask.Mask:
  """The index-based splash mask equal to `structural_mask` on aranges."""
  shape = (q_len, kv_len)
  if spec.window:
    # The query at t sees t-window+1 .. t: window-1 keys to the left, none to the right.
    return splash_mask.LocalMask(shape, window_size=(spec.window - 1, 0), offset=0)
  if spec.chunk:
    return _chunked_causal_mask(shape, spec.chunk)
  return splash_mask.CausalMask(shape) if spec.is_causal else splash_mask.FullMask(shape)


@functools.lru_cache(maxsize=64)
def _splash_kernel(spec: MaskSpec, q_len: int, kv_len: int, num_heads: int, mqa: bool,
                   soft_cap: float | None, block_sizes: splash.BlockSizes, interpret: bool):
  """Build (and cache: mask processing is numpy work per shape) one splash kernel."""
  head_mask = splash_mask_for(spec, q_len, kv_len)
  mask = splash_mask.MultiHeadMask([head_mask] * num_heads)
  make = splash.make_splash_mqa if mqa else splash.make_splash_mha
  # TPU interpret mode (simulated TPU memories) runs the kernel on CPU; it is
  # passed to the kernel itself, not set as a context, so that the backward
  # kernels traced later by jax.grad are interpreted too.
  # ensure_compile_time_eval: the kernel stores its block tables as arrays; a
  # first call under jit must not turn them into tracers kept in the cache.
  with jax.ensure_compile_time_eval():
    return make(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                attn_logits_soft_cap=soft_cap,
                interpret=pltpu.InterpretParams() if interpret else False)


def _splash_fits(request: Request) -> str | None:
  # Splash tiles both lengths in blocks of 128 lanes (_largest_block).
  bad = [f"{name} {n}" for name, n in (("q_len", request.q_len), ("kv_len", request.kv_len))
         if n is not None and n % _LANES]
  return f"{' and '.join(bad)} not a multiple of {_LANES}" if bad else None


@train_variant("flash", TPU, SPLASH_FEATURES | FLOAT32, "Pallas TPU splash", interpretable=True,
               limits=Limits(fits=_splash_fits, why="splash tiles lengths in 128-lane blocks"))
@train_kernel("splash_attention", SPLASH_FEATURES, index_masked=True, no_empty_rows=True)
def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array, call: TrainCall, *,
                     interpret: bool = False,
                     block_sizes: splash.BlockSizes | None = None) -> tuple[jax.Array, None]:
  """Splash attention of query [B, T, N, H] over key/value [B, S, K, H].

  Same arguments and results as `dot_product_attention` (weights are always
  None), plus `interpret` (run the Pallas kernels in TPU interpret mode, e.g.
  on CPU in tests) and `block_sizes` (default: the largest of 512/256/128
  dividing each length). Lengths must be multiples of 128.
  """
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  if block_sizes is None:
    block_sizes = default_block_sizes(q_len, kv_len)

  mqa = kv_heads == 1
  kernel = _splash_kernel(call.options.mask, q_len, kv_len, num_heads, mqa, call.options.soft_cap or None,
                          block_sizes, bool(interpret))

  # Splash does not scale; (q * scale) . k is the reference's (q . k) * scale.
  q = (query * jnp.asarray(call.options.scale, query.dtype)).transpose(0, 2, 1, 3)  # [B, N, T, H]
  k = key.transpose(0, 2, 1, 3)  # [B, K, S, H]
  v = value.transpose(0, 2, 1, 3)  # [B, K, S, H]
  if mqa:
    k, v = k[:, 0], v[:, 0]  # [B, S, H]
  segments = None
  if call.q_segment_ids is not None:
    segments = splash.SegmentIds(q=call.q_segment_ids.astype(jnp.int32),
                                 kv=call.kv_segment_ids.astype(jnp.int32))  # [B, T] / [B, S]
    # Splash zeroes the p of a masked pair but still multiplies it into p @ V
    # (0 * NaN = NaN), and lets padding attend to padding: the tokens no real
    # token pairs with are zeroed by a select first, so whatever they hold
    # reaches no visible output or gradient (as in online_softmax.py).
    live_q = rows_with_keys(call.options.mask, call.q_positions, call.kv_positions, call.q_segment_ids,
                            call.kv_segment_ids)  # [B, T]
    live_k = keys_with_rows(call.q_segment_ids, call.kv_segment_ids)  # [B, S]
    q = jnp.where(live_q[:, None, :, None], q, jnp.zeros((), q.dtype))  # [B, N, T, H]
    live_k = live_k[:, :, None] if mqa else live_k[:, None, :, None]  # [B, S, 1] / [B, 1, S, 1]
    k, v = (jnp.where(live_k, x, jnp.zeros((), x.dtype)) for x in (k, v))

  def one_example(q, k, v, segments):
    return kernel(q, k, v, segment_ids=segments, sinks=call.sinks)  # [N, T, H]

  if interpret:
    # The TPU interpreter cannot batch a pallas_call (vmap adds a grid axis its
    # dimension_semantics lack), so interpret mode loops over the batch.
    context = jax.lax.map(lambda args: one_example(*args), (q, k, v, segments))  # [B, N, T, H]
  else:
    context = jax.vmap(one_example)(q, k, v, segments)  # [B, N, T, H]
  context = context.transpose(0, 2, 1, 3)  # [B, T, N, H]
  if call.q_segment_ids is not None:
    # Also zeroes those rows' cotangents before splash's backward sees them.
    context = jnp.where(live_q[:, :, None, None], context, jnp.zeros((), context.dtype))
  return context.astype(query.dtype), None
