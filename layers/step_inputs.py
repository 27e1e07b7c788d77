"""Inputs of a prefill / decode call: validated, then checked against the cache.

`plan_step` is the one place a cached call's inputs are judged. Wrong shapes,
dtypes or modes raise `ValueError` at once (they are static). What depends on
values (slots, lengths, pages, padding) is folded into rejection bits
(`kvcache.step_checks`): eagerly they raise `StepRejected` before anything
is written; under jit the step is gated on them and the host raises after.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import jax
import jax.numpy as jnp
from flax import nnx

from meshattn.kvcache.step_checks import (
    Rejection, StepRejected, fold, host_callbacks_available, is_concrete, raise_now,
    repeated_slots)
from meshattn.layers.positions import flatten_positions


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """What a checked step may do."""
  rows: jax.Array  # [b] int32: the cache slot each row continues
  all_slots: bool  # rows are 0..B-1 in order (no `slots` given)
  valid: jax.Array  # [b, T] bool: tokens to attend and write; all False if rejected
  bits: jax.Array  # int32 scalar: Rejection bits, 0 = served
  ok: jax.Array  # bool scalar: bits == 0


_host_raises = threading.local()
_joint = threading.local()


@contextlib.contextmanager
def _scoped(store: threading.local, name: str, value):
  """`store.name = value` while inside, the previous value (None if unset) after."""
  previous = getattr(store, name, None)
  setattr(store, name, value)
  try:
    yield
  finally:
    setattr(store, name, previous)


def joint_verdict(ok):
  """Inside: every plan_step also needs `ok` (bool scalar), the verdict of a model's whole
  step, so a step one layer refuses leaves every layer's cache as it was."""
  return _scoped(_joint, "ok", ok)


def plan_model_step(layers, inputs_q, decoder_segment_ids, slots, model_mode) -> jax.Array:
  """Check a model step against every layer's cache before any layer runs: raises at once
  where the verdict is concrete (eager), else returns the joint `ok` (bool scalar) for
  `joint_verdict`; each layer still records its own rejection bits when it runs."""
  ok = jnp.asarray(True)
  for layer in layers:
    ok = ok & plan_step(layer.settings, layer.cache, inputs_q, decoder_segment_ids, slots,
                        model_mode).ok
  return ok


def host_raises_after_step():
  """While tracing inside `serving.jit_step`: the host turns rejection bits into
  the exception after the step, so the step needs no host callback."""
  return _scoped(_host_raises, "on", True)


def refuse_train_arguments(settings, model_mode: str, *, inputs_q, inputs_kv, inputs_v,
                           inputs_kv_positions, kv_segment_ids, mask, bias, sow_weights,
                           deterministic) -> None:
  """A prefill / decode call is self-attention over the cache: arguments that only
  train mode uses are refused (named), not ignored."""
  unsupported = {"inputs_kv (cross-attention)": inputs_kv is not None and inputs_kv is not inputs_q,
                 "inputs_v": inputs_v is not None,
                 "inputs_kv_positions": inputs_kv_positions is not None,
                 "kv_segment_ids": kv_segment_ids is not None, "mask": mask is not None,
                 "bias": bias is not None, "sow_weights": sow_weights,
                 "attention_fn": settings.kernel.attention_fn is not None,
                 "dropout (deterministic=False)": (not deterministic
                                                   and settings.kernel.dropout_rate > 0)}
  bad = [name for name, on in unsupported.items() if on]
  if bad:
    raise ValueError(f"model_mode={model_mode!r} does not support {bad}; they apply to train mode")


def rope_positions(inputs_positions, positions: jax.Array, streams: int) -> jax.Array:
  """RoPE positions of a cached step: the tokens' positions [B, T] in their sequences, or
  the caller's inputs_positions ([B, T], or MRoPE streams [n, B, T]) when given."""
  if inputs_positions is None:
    return positions
  batch, length = positions.shape
  rotated = flatten_positions(jnp.asarray(inputs_positions), (batch,), streams, "inputs_positions")
  if rotated.shape[-1] != length:
    raise ValueError(f"inputs_positions has shape {inputs_positions.shape}: its last axis "
                     f"must be the input length {length}")
  return rotated


@contextlib.contextmanager
def restore_on_error(cache):
  """Put the cache back as it was if an eager step fails part-way (state
  updates under jit are only applied on success anyway)."""
  saved = jax.tree.map(lambda x: x, nnx.state(cache))  # new Variables over the same (immutable) arrays
  try:
    yield
  except Exception:
    nnx.update(cache, saved)
    raise


def _check_static(settings, cache, inputs_q, decoder_segment_ids, slots, model_mode) -> None:
  """Shape / dtype / mode errors: raised at once, in every mode (they are known when tracing)."""
  if inputs_q.ndim != 3:
    raise ValueError(f"model_mode={model_mode!r} takes inputs_q [batch, length, emb_dim], "
                     f"got shape {inputs_q.shape}")
  batch, length = inputs_q.shape[:2]
  chunked = settings.lengths.prefill_chunk_size is not None
  if not settings.mask.is_causal and (model_mode == "autoregressive" or chunked):
    # A bidirectional layer's earlier tokens would have to see later ones: a
    # cache can only serve it as one whole-prompt prefill.
    raise ValueError("attention_type='full' (bidirectional) cannot decode or prefill in "
                     "chunks; use one prefill call per prompt or a causal attention_type")
  if length == 0:
    raise ValueError(f"model_mode={model_mode!r} needs at least one token per row, got "
                     f"inputs_q of shape {inputs_q.shape}")
  if model_mode == "autoregressive" and length != 1:
    raise ValueError(f"model_mode='autoregressive' takes one token per sequence, got length {length}")
  longest = settings.lengths.max_prefill_predict_length
  if model_mode == "prefill" and length > longest:
    raise ValueError(f"prefill of {length} tokens: longer than max_prefill_predict_length="
                     f"{longest}; split the prompt into several prefill calls (each continues "
                     "the slot) or raise that key (use_chunked_prefill bounds the memory of one "
                     "call, not its length)")
  if decoder_segment_ids is not None:
    seg = jnp.asarray(decoder_segment_ids)
    if seg.shape != (batch, length):
      raise ValueError(f"decoder_segment_ids has shape {tuple(seg.shape)}; in model_mode="
                       f"{model_mode!r} it must be [batch, length] = ({batch}, {length}), one id "
                       "per input token (nonzero = real, 0 = right padding)")
    if not (jnp.issubdtype(seg.dtype, jnp.integer) or seg.dtype == jnp.bool_):
      raise ValueError(f"decoder_segment_ids must be integers (or bool), got dtype {seg.dtype}")
  if slots is None:
    if batch != cache.batch_size:
      raise ValueError(f"inputs batch {batch} != KV cache batch_size {cache.batch_size}; "
                       "pass slots=[...] to prefill or decode a subset of the cache's slots")
  else:
    slots = jnp.asarray(slots)
    if not jnp.issubdtype(slots.dtype, jnp.integer):
      raise ValueError(f"slots must be integer cache slot ids, got dtype {slots.dtype}")
    if jnp.atleast_1d(slots).shape != (batch,):
      raise ValueError(f"slots has shape {tuple(slots.shape)}; expected ({batch},), one slot per row")


def plan_step(settings, cache, inputs_q, decoder_segment_ids, slots, model_mode) -> StepPlan:
  """Validate a cached call's inputs and check it against the cache (see module doc)."""
  if cache is None:
    raise ValueError(f"model_mode={model_mode!r} needs a KV cache: call init_cache(batch_size, "
                     "max_length) first")
  _check_static(settings, cache, inputs_q, decoder_segment_ids, slots, model_mode)
  batch, length = inputs_q.shape[:2]
  if slots is None:
    rows = jnp.arange(batch, dtype=jnp.int32)
  else:
    rows = jnp.atleast_1d(jnp.asarray(slots)).astype(jnp.int32)  # [b]
  seg = None if decoder_segment_ids is None else jnp.asarray(decoder_segment_ids)  # [b, T]
  valid = jnp.ones((batch, length), bool) if seg is None else seg != 0  # [b, T] real tokens
  safe_rows = jnp.clip(rows, 0, cache.batch_size - 1)
  start = cache.lengths[...][safe_rows]  # [b]
  if model_mode == "autoregressive":
    valid = valid & (start > 0)[:, None]  # empty slots stay empty
  new_lengths = start + jnp.sum(valid, axis=1, dtype=jnp.int32)  # [b]
  conditions = cache.step_conditions(rows, new_lengths)
  if slots is not None:
    conditions[Rejection.DUPLICATE_SLOT] = repeated_slots(rows)
  if decoder_segment_ids is not None and length > 1:
    # Tokens are appended at consecutive positions, so padding may only trail.
    conditions[Rejection.LEFT_PADDING] = valid[:, 1:] & ~valid[:, :-1]
    # A row continues one slot: a second id in it would be a second sequence attending to the
    # first (train mode packs rows; a cache cannot).
    conditions[Rejection.PACKED_ROW] = valid & (seg != seg[:, :1])
  if not settings.mask.is_causal:
    conditions[Rejection.BIDIRECTIONAL_NOT_EMPTY] = start > 0
  bits = fold(conditions)
  raise_now(bits, lambda b: cache.explain(b, rows, new_lengths))
  ok = bits == 0
  joint = getattr(_joint, "ok", None)
  if joint is not None:  # another layer of the same model step refuses: write nothing either
    ok = ok & joint
  return StepPlan(rows=rows, all_slots=slots is None, valid=valid & ok, bits=bits, ok=ok)


def record(cache, plan: StepPlan, mesh) -> None:
  """Add the step's rejection bits to the cache's (read and cleared by the host).

  A traced step outside `serving.jit_step` on one CPU device also raises from
  a host callback, as a plain `nnx.jit` caller expects: one device has no
  collective to leave waiting. On a multi-device mesh it never does (a raise
  there aborts the process), nor on an accelerator (the failure would arrive
  asynchronously and poison the outputs); the caller reads the bits
  (`raise_if_rejected`).
  """
  # OR, not set: a loop that checks only now and then (jit_step(check=False)) must still
  # hear of a step rejected several steps ago; raise_if_rejected clears the bits it reports.
  cache.rejected[...] = cache.rejected[...] | plan.bits
  if is_concrete(plan.bits) or getattr(_host_raises, "on", False):
    return
  single_device = mesh is None or mesh.size == 1
  # Only on the CPU backend: a failed callback there fails the call at once. On a GPU the
  # failure arrives asynchronously and poisons the step's outputs, the cache among them.
  if single_device and jax.default_backend() == "cpu" and host_callbacks_available():
    message = lambda bits: cache.explain(int(bits))

    def check(bits):
      if bits:
        raise StepRejected(message(bits))

    jax.debug.callback(check, plan.bits)
