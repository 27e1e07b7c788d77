"""From a layer's settings to a kernel call: the features a call needs, the registry's
choice, the loaded function, and the call itself (under shard_map where the layer has a
mesh). The layer asks here; the registry decides; nothing else picks kernels.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from meshattn.configs.vocabulary import MASK_FEATURE
from meshattn.layers.kernels import registry
from meshattn.layers.kernels.api import KernelOptions
from meshattn.layers.kernels.sharded import sharded_kernel_call


def kernel_options(settings) -> KernelOptions:
  """The static options every kernel of this layer gets (settings.kernel, the mask)."""
  k = settings.kernel
  return KernelOptions(
      mask=settings.mask, scale=k.scale, soft_cap=k.attn_logits_soft_cap,
      float32_qk_product=k.float32_qk_product, float32_logits=k.float32_logits,
      dropout_rate=k.dropout_rate, broadcast_dropout=k.broadcast_dropout,
      precision=settings.precision, score_mod=k.score_mod, mask_mod=k.mask_mod)


def call_features(settings, mode: str, *, cache=None, segments: bool = False,
                  mask: bool = False, bias: bool = False, dropout: bool = False,
                  weights: bool = False) -> frozenset[str]:
  """The registry features a call of this layer needs (nothing the layer does is left out).

  A cached mode adds what the cache's kind asks of a kernel (`cache.kernel_features`,
  e.g. "paged_kv": only kernels that read pages serve it)."""
  k = settings.kernel
  flags = {
      "gqa": settings.shape.group_size > 1, "segment_ids": segments,
      "soft_cap": k.attn_logits_soft_cap is not None, "sinks": k.attention_sink,
      "user_mask": mask, "user_bias": bias, "score_mod": k.score_mod is not None,
      "mask_mod": k.mask_mod is not None, "dropout": dropout, "weights": weights,
      "backward": mode == "train", "float32": jnp.dtype(settings.dtype) == jnp.float32,
      "quantized_kv": mode != "train" and settings.cache.kv_quant is not None}
  wanted = {MASK_FEATURE[settings.mask.attention_type]} | {n for n, on in flags.items() if on}
  if mode != "train" and cache is not None:
    wanted |= cache.kernel_features
  return frozenset(wanted)


def platform(settings) -> str:
  """Where the kernels run: pallas_interpret runs the TPU Pallas kernels on this host."""
  return "tpu" if settings.kernel.pallas_interpret else registry.current_platform()


def select(settings, mode: str, features: frozenset[str],
           lengths: tuple[int | None, int | None] = (None, None), cache=None) -> registry.Kernel:
  """The kernel for this call: `attention` in train mode, `decode_attention` in
  autoregressive mode, the reference cached step for prefill. lengths (query, key),
  where known, let autoselect skip kernels that cannot tile them; a cache (decode) adds
  what it stores (dtype, capacity, per-head scales), which decode variants are limited by."""
  k, shape = settings.kernel, settings.shape
  name = {"train": k.attention, "autoregressive": k.decode_attention}.get(mode, "dot_product")
  kv = {}
  if cache is not None:
    quant = cache.quant
    per_head = quant is not None and quant.scale_shape(cache.num_kv_heads) == cache.num_kv_heads
    kv = dict(kv_dtype=cache.storage_dtype, group=shape.group_size,
              kv_quant_axis=None if quant is None else "dkv" if per_head else "heads_and_dkv")
    lengths = (lengths[0], cache.capacity)
  request = registry.Request(platform(settings), mode, features, head_dim=shape.head_dim,
                             dtype=settings.dtype, q_len=lengths[0], kv_len=lengths[1], **kv)
  try:
    return registry.select(name, request)
  except ValueError as error:
    key = {"train": "attention", "autoregressive": "decode_attention"}.get(mode)
    if key is None:
      raise
    # The registry speaks of kernels; the user chose a key: name it.
    raise ValueError(f"{key}={name!r} ({mode} mode): {error}") from None


def load(settings, kernel: registry.Kernel) -> Callable:
  """The kernel's function; kernels with a Pallas interpret mode get it when asked."""
  fn = kernel.load()
  if settings.kernel.pallas_interpret and kernel.interpretable:
    fn = functools.partial(fn, interpret=True)
  return fn


def train_kernel(settings, mode: str, features: frozenset[str],
                 lengths: tuple[int | None, int | None] = (None, None)) -> tuple[Callable, str]:
  """(kernel fn, length layout) for a train-protocol call: how shard_map splits the
  sequence for it (registry.Kernel.length_layout: an index-masked kernel keeps the query
  length whole, the ring kernel keeps K/V split too)."""
  kernel = select(settings, mode, features, lengths)
  return load(settings, kernel), kernel.length_layout


def call_train_kernel(kernel: Callable, mesh, rules, axes, query, key, value, *,
                      shard: bool = True, layout: str = "split", return_weights: bool = False,
                      **kernel_args) -> tuple[jax.Array, jax.Array | None]:
  """A train kernel: under shard_map over the mesh (if any and `shard`), else as is.

  layout (registry.Kernel.length_layout): "split" splits the query length and gathers
  K/V, "whole" keeps the query length on every shard (kernels that mask by token index),
  "ring" splits K/V too (see `sharded_kernel_call`)."""
  if mesh is not None and shard:
    return sharded_kernel_call(kernel, mesh, rules, axes, query, key, value, layout=layout,
                               **kernel_args)
  return kernel(query, key, value, return_weights=return_weights, **kernel_args)


def decode_kernel(settings, cache) -> Callable | None:
  """The decode-protocol kernel for an autoregressive step over `cache`, or None where the
  registry picks the reference cached step (the block-by-block pass of cached_step)."""
  features = call_features(settings, "autoregressive", cache=cache)
  kernel = select(settings, "autoregressive", features, cache=cache)
  return load(settings, kernel) if kernel.protocol == "decode" else None
