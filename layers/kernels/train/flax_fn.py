"""Adapter for a user `attention_fn` with Flax's `dot_product_attention` signature.

Flax parity: the keywords flax.nnx.MultiHeadAttention passes, and only those:
`attention_fn(query, key, value, mask=, dropout_rng=, dropout_rate=,
broadcast_dropout=, deterministic=, dtype=, precision=, module=, is_causal=)`
(`module` is the layer when the call sows weights, else None; a keyword the
function does not take is left out, as Linen's layer does), plus `bias=`
only when the call has one; with query/key/value [batch, length, heads,
head_dim] and the same number of heads in all three. Called by the Flax
drop-in (within `flax_call`), its output is used as is, as in Flax (a query
that sees no key gets whatever the function gives it); called by meshattn's
own Attention, such a query outputs zeros, that layer's contract. The adapter therefore repeats K/V heads for GQA/MQA,
folds every mask (causal / window / chunk, segments, the user's) into the
boolean `mask`, and pre-scales the query so that Flax's own 1/sqrt(head_dim)
turns into the layer's softmax scale. Soft cap and sinks have no place in that
signature, so asking for them with an attention_fn is an error.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

from meshattn.layers.kernels.api import KernelOptions
from meshattn.layers.kernels.train.dot_product import visible_mask


# (module, is_causal, extra keywords) of the Flax drop-in's call in progress, None outside
# one: the train path reaches call_flax_attention_fn through Attention, which knows none.
_FLAX_CALL: contextvars.ContextVar[tuple[Any, bool, dict] | None] = contextvars.ContextVar(
    "flax_call", default=None)


@contextlib.contextmanager
def flax_call(module: Any, is_causal: bool, **extra: Any) -> Iterator[None]:
  """Within it, attention_fn gets `module=module, is_causal=is_causal` (Flax's call values)
  and `extra` (Linen's layer also passes force_fp32_for_softmax), each where it takes it."""
  token = _FLAX_CALL.set((module, is_causal, extra))
  try:
    yield
  finally:
    _FLAX_CALL.reset(token)


def _accepted(fn: Callable) -> Callable[[str], bool]:
  """Which keywords fn takes (all where it has **kwargs or no readable signature)."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):  # no signature to read: let the call decide
    return lambda name: True
  if any(p.kind is p.VAR_KEYWORD for p in params):
    return lambda name: True
  names = {p.name for p in params}
  return names.__contains__


def _takes_bias(fn: Callable) -> bool:
  return _accepted(fn)("bias")


def call_flax_attention_fn(
    attention_fn: Callable[..., jax.Array], query, key, value, *, options: KernelOptions,
    q_positions, kv_positions, q_segment_ids, kv_segment_ids, sinks, mask, bias, dropout_rng,
    deterministic, dtype, precision) -> tuple[jax.Array, None]:
  """Run attention_fn on query [B, T, N, H], key/value [B, S, K, H]; returns ([B, T, N, H], None)."""
  if options.soft_cap:
    raise ValueError("attention_fn cannot apply attn_logits_soft_cap (not in the Flax signature); "
                     "use the built-in kernels")
  if options.score_mod is not None:
    raise ValueError("attention_fn cannot apply score_mod (not in the Flax signature); "
                     "use the built-in kernels")
  if sinks is not None:
    raise ValueError("attention_fn cannot apply attention_sink (not in the Flax signature); "
                     "use the built-in kernels")
  extra = {}
  if bias is not None:  # Flax's layer never passes bias; meshattn's does when the call has one
    if not _takes_bias(attention_fn):
      raise ValueError(f"bias= was given, but attention_fn {attention_fn!r} takes no `bias` "
                       "keyword (Flax's dot_product_attention does); drop bias or accept it")
    extra["bias"] = bias
  batch, q_len, num_heads, head_dim = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  group = num_heads // kv_heads
  key = jnp.repeat(key, group, axis=2)  # [B, S, N, H]
  value = jnp.repeat(value, group, axis=2)  # [B, S, N, H]
  user = None if mask is None else jnp.broadcast_to(
      mask.reshape((1,) * (4 - mask.ndim) + mask.shape), (batch, mask.shape[-3] if mask.ndim >= 3 else 1,
                                                          q_len, kv_len))
  allowed = visible_mask(options, q_positions, kv_positions, q_segment_ids, kv_segment_ids, None,
                         kv_heads=num_heads, group=1)  # [B, 1 or N, 1, T, S]: K/V are repeated
  allowed = allowed[:, :, 0]  # [B, 1 or N, T, S]
  if user is not None:
    allowed = allowed & user.astype(bool)  # [B, 1 or N, T, S]
  query = query * jnp.asarray(options.scale * math.sqrt(head_dim), query.dtype)
  flax = _FLAX_CALL.get()
  module, is_causal, extra_flax = (None, False, {}) if flax is None else flax
  # Flax's layer hands its function mask=None when nothing is masked (a function may take a
  # faster path then); meshattn's own calls pass the mask they computed.
  nothing_masked = (flax is not None and mask is None and q_segment_ids is None
                    and not options.mask.is_causal and options.mask_mod is None)
  flax_keywords = dict(
      mask=None if nothing_masked else allowed, dropout_rng=dropout_rng, dropout_rate=options.dropout_rate,
      broadcast_dropout=options.broadcast_dropout, deterministic=deterministic, dtype=dtype,
      precision=precision, module=module, is_causal=is_causal, **extra_flax)
  # A function written for Linen's layer, which passes only the keywords a function takes,
  # may lack some of NNX's (module, is_causal): leave those out rather than fail.
  takes = _accepted(attention_fn)
  flax_keywords = {name: value for name, value in flax_keywords.items() if takes(name)}
  context = attention_fn(query, key, value, **flax_keywords, **extra)  # [B, T, N, H]
  if flax is None:  # meshattn's Attention: a query that sees no key outputs zeros (selected)
    has_key = jnp.any(allowed, axis=-1)  # [B, 1 or N, T]
    context = jnp.where(jnp.swapaxes(has_key, 1, 2)[..., None], context, 0.0).astype(
        context.dtype)
  return context, None
