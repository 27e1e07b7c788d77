"""Invisible values never reach visible outputs (issue 14).

A key no query may see (a padding token, segment 0; a cache entry past its
slot's length, position -1) can hold anything: NaN, +inf, a previous
occupant's data. Masking by multiplication leaks it (0 * NaN = NaN in p @ V,
in dq = dLogits @ K and in dk = dLogits^T Q), so every kernel selects instead.
Planted NaN / +inf must leave the real tokens' outputs equal to the float64
reference over the clean inputs, and their gradients finite and equal to the
clean run's; the layer must decode a reset slot exactly as a fresh cache does
with NaN left in the entries past the new sequence's length.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from helpers.numpy_reference import attention_core_np
from meshattn.configs import load_config
from meshattn.layers import Attention, KernelOptions, MaskSpec, dot_product_attention
from meshattn.layers.kernels.train.blockwise import blockwise_attention
from meshattn.layers.kernels.train import flash_gpu
from meshattn.layers.kernels.decode.cached import attend_with_cache
from meshattn.layers.kernels.train.flash_pallas_gpu import pallas_gpu_flash_attention
from meshattn.layers.kernels.train.flash_tpu import splash_attention
from meshattn.layers.kernels.train.ring import ring_attention

B, T, N, H = 2, 8, 4, 8
# Row 0: two packed documents, right padding; row 1: left padding.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1]], np.int32)  # [B, T]
PAD = SEGMENTS == 0  # [B, T]
IDX = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))  # [B, T]


def _plant(x, rows_nan, rows_inf):
  """x [B, L, ...] with NaN at rows_nan and +inf at rows_inf ([B, L] booleans)."""
  expand = (slice(None), slice(None)) + (None,) * (x.ndim - 2)
  x = jnp.where(jnp.asarray(rows_nan)[expand], jnp.nan, x)
  return jnp.where(jnp.asarray(rows_inf)[expand], jnp.inf, x)


def _poison(x, invisible):
  """NaN in row 0's invisible entries, +inf in row 1's."""
  first = np.zeros_like(invisible)
  first[0] = True
  return _plant(x, invisible & first, invisible & ~first)


def _qkv(kv_heads, seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (B, T, N, H), jnp.float32)  # [B, T, N, H]
  k = jax.random.normal(keys[1], (B, T, kv_heads, H), jnp.float32)  # [B, T, K, H]
  v = jax.random.normal(keys[2], (B, T, kv_heads, H), jnp.float32)  # [B, T, K, H]
  cot = jax.random.normal(keys[3], (B, T, N, H), jnp.float32)  # [B, T, N, H]
  return q, k, v, cot


def _ring_2_shards(q, k, v, **kw):
  """Ring attention over two sequence shards: a padding block travels by ppermute."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("context",))
  seq = P(None, "context")
  names = ("q_positions", "kv_positions", "q_segment_ids", "kv_segment_ids")
  arrays = [kw.pop(name) for name in names]

  def shard(q, k, v, *arrays):
    return ring_attention(q, k, v, **kw, **dict(zip(names, arrays)), axis_name="context")[0]

  out = jax.shard_map(shard, mesh=mesh, in_specs=(seq,) * 7, out_specs=seq, check_vma=False)(
      q, k, v, *arrays)
  return out, None


KERNELS = {
    "dot_product": dot_product_attention,
    "blockwise": functools.partial(blockwise_attention, block_q=4, block_kv=4),
    "ring": ring_attention,
    "ring_2_shards": _ring_2_shards,
}
CASES = [  # (kernel, kv heads, mask)
    ("dot_product", 4, "global"), ("dot_product", 2, "full"),
    ("blockwise", 4, "full"), ("blockwise", 2, "global"),
    ("ring", 4, "global"), ("ring", 2, "full"),
    ("ring_2_shards", 2, "global"),
]


@functools.lru_cache(maxsize=None)
def _values_and_grads(kernel_name, mask):
  """Jitted once per (kernel, mask, shapes): context and (dq, dk, dv) of sum(context * cot)."""
  options = KernelOptions(mask=MaskSpec(mask), scale=H ** -0.5)
  seg = jnp.asarray(SEGMENTS)
  kw = dict(options=options, q_positions=jnp.asarray(IDX), kv_positions=jnp.asarray(IDX),
            q_segment_ids=seg, kv_segment_ids=seg)
  kernel = KERNELS[kernel_name]

  @jax.jit
  def run(q, k, v, cot):
    context, vjp = jax.vjp(lambda q, k, v: kernel(q, k, v, **kw)[0], q, k, v)
    return context, vjp(cot)

  return run


def _visible_np(mask):
  vis = (SEGMENTS[:, :, None] == SEGMENTS[:, None, :]) & ~PAD[:, :, None]  # [B, T, S]
  if mask == "global":
    vis &= np.tril(np.ones((T, T), bool))
  return vis[:, None]  # [B, 1, T, S]


def assert_padding_never_leaks(out, want, pad, grads, clean_grads):
  """Real tokens equal the reference, padding outputs zero; dq/dk/dv finite, zero on padding
  and equal to the run without planted values."""
  np.testing.assert_allclose(np.asarray(out)[~pad], want[~pad], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out)[pad], 0.0)
  for name, got, clean in zip("qkv", grads, clean_grads):
    got = np.asarray(got)
    assert np.isfinite(got).all(), f"d{name} is not finite"
    np.testing.assert_array_equal(got[pad], 0.0, err_msg=f"d{name} of padding")
    np.testing.assert_allclose(got, clean, rtol=1e-6, atol=1e-7, err_msg=f"d{name}")


@pytest.mark.parametrize("kernel, kv_heads, mask", CASES,
                         ids=[f"{k}-{'mha' if h == N else 'gqa'}-{m}" for k, h, m in CASES])
def test_padding_values_do_not_reach_real_tokens(kernel, kv_heads, mask):
  """NaN / +inf in the padding tokens' q, k, v (and in the padding rows' output cotangent,
  as a later layer's NaN padding would send back) leave the real tokens' context equal to the
  float64 reference and every gradient equal to the clean run's (finite; zero for padding)."""
  q, k, v, cot = _qkv(kv_heads)
  run = _values_and_grads(kernel, mask)
  clean_out, clean_grads = run(q, k, v, cot)
  out, grads = run(*(_poison(x, PAD) for x in (q, k, v, cot)))

  want, _ = attention_core_np(np.asarray(q), np.asarray(k), np.asarray(v), scale=H ** -0.5,
                              visible=_visible_np(mask))  # [B, T, N, H]
  assert_padding_never_leaks(out, want, PAD, grads, clean_grads)


def test_splash_interpret_padding_values_do_not_reach_real_tokens():
  """The same for splash (Pallas TPU, interpret mode on CPU), GQA, causal packed segments in
  one 128-token block (interpret mode costs seconds: one example, NaN in the left padding,
  +inf in the right): splash lets padding attend to padding and multiplies p into V."""
  length = 128
  seg = np.zeros((1, length), np.int32)
  seg[0, 10:60], seg[0, 60:100] = 1, 2
  pad = seg == 0  # [1, T]
  left = np.arange(length)[None, :] < 64
  poison = lambda x: _plant(x, pad & left, pad & ~left)
  keys = jax.random.split(jax.random.key(4), 4)
  q, cot = (jax.random.normal(x, (1, length, N, H), jnp.float32) for x in keys[:2])  # [1, T, N, H]
  k, v = (jax.random.normal(x, (1, length, 2, H), jnp.float32) for x in keys[2:])  # [1, S, K, H]
  idx = jnp.arange(length, dtype=jnp.int32)[None, :]  # [1, T]
  kw = dict(options=KernelOptions(mask=MaskSpec("global"), scale=H ** -0.5), q_positions=idx,
            kv_positions=idx, q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg),
            interpret=True)

  @jax.jit
  def run(q, k, v, cot):
    context, vjp = jax.vjp(lambda q, k, v: splash_attention(q, k, v, **kw)[0], q, k, v)
    return context, vjp(cot)

  clean_out, clean_grads = run(q, k, v, cot)
  out, grads = run(*(poison(x) for x in (q, k, v, cot)))
  vis = (seg[:, :, None] == seg[:, None, :]) & ~pad[:, :, None] & np.tril(
      np.ones((length, length), bool))  # [1, T, S]
  want, _ = attention_core_np(np.asarray(q), np.asarray(k), np.asarray(v), scale=H ** -0.5,
                              visible=vis[:, None])  # [1, T, N, H]
  np.testing.assert_allclose(np.asarray(out)[~pad], want[~pad], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out)[pad], 0.0)
  for name, got, clean in zip("qkv", grads, clean_grads):
    assert np.isfinite(np.asarray(got)).all(), f"d{name} is not finite"
    np.testing.assert_allclose(got, clean, rtol=1e-6, atol=1e-7, err_msg=f"d{name}")


PALLAS_T, PALLAS_H = 32, 16  # the kernel needs head_dim >= 16; 16-blocks give mixed tiles
# Row 0: two packed documents, right padding; row 1: left padding. Blocks of 16 hold real and
# padding tokens together (the masked edge tiles, where p is zeroed but still meets V).
PALLAS_SEGMENTS = np.array([[1] * 10 + [2] * 14 + [0] * 8, [0] * 6 + [1] * 26], np.int32)


@pytest.mark.parametrize("kv_heads, mask", [(4, "global"), (2, "full")], ids=["mha", "gqa"])
def test_pallas_gpu_interpret_padding_values_do_not_reach_real_tokens(kv_heads, mask):
  """The same for the Pallas GPU flash kernel (Pallas interpreter on CPU), 16x16 tiles: its
  forward multiplies a zeroed p into V, its backward a zeroed p / dLogits into dO, K and Q."""
  seg = PALLAS_SEGMENTS
  pad = seg == 0  # [B, T]
  keys = jax.random.split(jax.random.key(5), 4)
  q, cot = (jax.random.normal(x, (B, PALLAS_T, N, PALLAS_H), jnp.float32)
            for x in keys[:2])  # [B, T, N, H]
  k, v = (jax.random.normal(x, (B, PALLAS_T, kv_heads, PALLAS_H), jnp.float32)
          for x in keys[2:])  # [B, S, K, H]
  idx = jnp.broadcast_to(jnp.arange(PALLAS_T, dtype=jnp.int32), (B, PALLAS_T))  # [B, T]
  kw = dict(options=KernelOptions(mask=MaskSpec(mask), scale=PALLAS_H ** -0.5), q_positions=idx,
            kv_positions=idx, q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg),
            block_q=16, block_kv=16, interpret=True)

  @jax.jit
  def run(q, k, v, cot):
    context, vjp = jax.vjp(lambda q, k, v: pallas_gpu_flash_attention(q, k, v, **kw)[0], q, k, v)
    return context, vjp(cot)

  clean_out, clean_grads = run(q, k, v, cot)
  out, grads = run(*(_poison(x, pad) for x in (q, k, v, cot)))
  vis = (seg[:, :, None] == seg[:, None, :]) & ~pad[:, :, None]  # [B, T, S]
  if mask == "global":
    vis &= np.tril(np.ones((PALLAS_T, PALLAS_T), bool))
  want, _ = attention_core_np(np.asarray(q), np.asarray(k), np.asarray(v), scale=PALLAS_H ** -0.5,
                              visible=vis[:, None])  # [B, T, N, H]
  assert_padding_never_leaks(out, want, pad, grads, clean_grads)


def test_pallas_gpu_interpret_padding_cotangent_does_not_reach_sink_gradients():
  """With sinks, d sinks = -sum p_sink * rowsum(o * do): a padding row's NaN / inf cotangent
  (its output is zero) must not enter it, nor the padding's q / k / v the outputs."""
  seg = PALLAS_SEGMENTS
  pad = seg == 0  # [B, T]
  keys = jax.random.split(jax.random.key(6), 5)
  q, cot = (jax.random.normal(x, (B, PALLAS_T, N, PALLAS_H), jnp.float32) for x in keys[:2])
  k, v = (jax.random.normal(x, (B, PALLAS_T, 2, PALLAS_H), jnp.float32) for x in keys[2:4])
  sinks = jax.random.normal(keys[4], (N,), jnp.float32)  # [N]
  idx = jnp.broadcast_to(jnp.arange(PALLAS_T, dtype=jnp.int32), (B, PALLAS_T))  # [B, T]
  kw = dict(options=KernelOptions(mask=MaskSpec("global"), scale=PALLAS_H ** -0.5),
            q_positions=idx, kv_positions=idx, q_segment_ids=jnp.asarray(seg),
            kv_segment_ids=jnp.asarray(seg), block_q=16, block_kv=16, interpret=True)

  @jax.jit
  def run(q, k, v, sinks, cot):
    context, vjp = jax.vjp(lambda q, k, v, s: pallas_gpu_flash_attention(
        q, k, v, sinks=s, **kw)[0], q, k, v, sinks)
    return context, vjp(cot)

  clean_out, clean_grads = run(q, k, v, sinks, cot)
  out, grads = run(*(_poison(x, pad) for x in (q, k, v)), sinks, _poison(cot, pad))
  np.testing.assert_allclose(out, clean_out, rtol=1e-6, atol=1e-7)
  for name, got, clean in zip(("q", "k", "v", "sinks"), grads, clean_grads):
    assert np.isfinite(np.asarray(got)).all(), f"d{name} is not finite"
    np.testing.assert_allclose(got, clean, rtol=1e-5, atol=1e-6, err_msg=f"d{name}")


def test_cudnn_wrapper_user_mask_padding_values_do_not_reach_real_tokens(monkeypatch):
  """cudnn_attention's only way to hide keys is the user mask (it refuses segment ids). On CPU
  jax.nn's XLA implementation stands in for cuDNN: it masks the same way (a large negative
  logit, then p @ V), so it leaks the same. bfloat16 (cuDNN's dtypes), GQA, causal."""
  xla = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, implementation=None, **kw: xla(*a, implementation="xla", **kw))
  q, k, v, cot = (x.astype(jnp.bfloat16) for x in _qkv(2, seed=6))
  visible = _visible_np("global")  # [B, 1, T, S]: the packing / padding mask, causal included
  kw = dict(options=KernelOptions(mask=MaskSpec("global"), scale=H ** -0.5),
            q_positions=jnp.asarray(IDX), kv_positions=jnp.asarray(IDX),
            mask=jnp.asarray(visible))

  @jax.jit
  def run(q, k, v, cot):
    context, vjp = jax.vjp(lambda q, k, v: flash_gpu.cudnn_attention(q, k, v, **kw)[0], q, k, v)
    return context, vjp(cot)

  clean_out, clean_grads = run(q, k, v, cot)
  out, grads = run(*(_poison(x, PAD) for x in (q, k, v, cot)))
  f32 = lambda x: np.asarray(x, np.float32)
  want, _ = attention_core_np(f32(q), f32(k), f32(v), scale=H ** -0.5, visible=visible)
  np.testing.assert_allclose(f32(out)[~PAD], want[~PAD], rtol=2e-2, atol=2e-2)
  np.testing.assert_array_equal(f32(out)[PAD], 0.0)
  np.testing.assert_array_equal(f32(out), f32(clean_out))
  for name, got, clean in zip("qkv", grads, clean_grads):
    got = f32(got)
    assert np.isfinite(got).all(), f"d{name} is not finite"
    np.testing.assert_array_equal(got[PAD], 0.0, err_msg=f"d{name} of padding")
    np.testing.assert_array_equal(got, f32(clean), err_msg=f"d{name}")


# ---- The cached path: stale entries past a slot's length -----------------------------------

CAPACITY, BLOCK = 8, 4
LENGTHS = np.array([5, 2], np.int32)  # [B]: entries [length, CAPACITY) are stale
STEP = 3  # prefill-like step: row 0 has 3 tokens, row 1 two and a padding token
VALID = np.arange(STEP)[None, :] < np.array([[STEP], [STEP - 1]])  # [B, T]
SINKS = np.linspace(-1.0, 1.0, N, dtype=np.float32)  # [N]
CACHED_OPTIONS = KernelOptions(mask=MaskSpec("global"), scale=H ** -0.5, soft_cap=5.0)


@jax.jit
def _cached_run(q, new_k, new_v, cache_k, cache_v, cot):
  """attend_with_cache over a cache [B, C, K, H] read in blocks: context and (dq, dk, dv)."""
  entry = np.arange(CAPACITY)[None, :]
  entry_pos = jnp.asarray(np.where(entry < LENGTHS[:, None], entry, -1))  # [B, C]
  positions = jnp.asarray(LENGTHS[:, None] + np.arange(STEP)[None, :])  # [B, T]
  valid = jnp.asarray(VALID)

  def read_block(i):
    start = i * BLOCK
    return (jax.lax.dynamic_slice_in_dim(cache_k, start, BLOCK, 1),
            jax.lax.dynamic_slice_in_dim(cache_v, start, BLOCK, 1),
            jax.lax.dynamic_slice_in_dim(entry_pos, start, BLOCK, 1))  # [B, bs, K, H], [B, bs]

  def attend(q, new_k, new_v):
    return attend_with_cache(q, new_k, new_v, options=CACHED_OPTIONS, q_positions=positions,
                             q_valid=valid, new_positions=jnp.where(valid, positions, -1),
                             read_block=read_block, num_blocks=CAPACITY // BLOCK,
                             sinks=jnp.asarray(SINKS))

  context, vjp = jax.vjp(attend, q, new_k, new_v)
  return context, vjp(cot)


def _cached_reference(q, new_k, new_v, cache_k, cache_v):
  """float64: each row over its cached entries [0, length) and its valid new tokens."""
  out = np.zeros(q.shape)
  for b in range(B):
    keys = np.concatenate([cache_k[b, :LENGTHS[b]], new_k[b][VALID[b]]])[None]  # [1, S, K, H]
    values = np.concatenate([cache_v[b, :LENGTHS[b]], new_v[b][VALID[b]]])[None]
    vis = np.arange(keys.shape[1])[None, :] <= LENGTHS[b] + np.arange(STEP)[:, None]  # [T, S]
    ctx, _ = attention_core_np(q[b:b + 1], keys, values, scale=H ** -0.5, visible=vis,
                               soft_cap=5.0, sinks=SINKS)  # [1, T, N, H]
    out[b] = np.where(VALID[b][:, None, None], ctx[0], 0.0)
  return out


def test_stale_cache_entries_do_not_reach_the_step():
  """attend_with_cache (prefill over a non-empty cache, and every dot_product decode step):
  NaN / +inf in the entries past each slot's length and in the step's padding token (q, k, v
  and its cotangent) change nothing; the gradients stay finite."""
  keys = jax.random.split(jax.random.key(1), 6)
  q, cot = (jax.random.normal(x, (B, STEP, N, H), jnp.float32) for x in keys[:2])  # [B, T, N, H]
  new_k, new_v = (jax.random.normal(x, (B, STEP, 2, H), jnp.float32) for x in keys[2:4])
  cache_k, cache_v = (jax.random.normal(x, (B, CAPACITY, 2, H), jnp.float32)
                      for x in keys[4:])  # [B, C, K, H]
  stale = np.arange(CAPACITY)[None, :] >= LENGTHS[:, None]  # [B, C]
  clean_out, clean_grads = _cached_run(q, new_k, new_v, cache_k, cache_v, cot)
  out, grads = _cached_run(*(_poison(x, ~VALID) for x in (q, new_k, new_v)),
                           _poison(cache_k, stale), _poison(cache_v, stale), _poison(cot, ~VALID))
  want = _cached_reference(*(np.asarray(x) for x in (q, new_k, new_v, cache_k, cache_v)))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out, clean_out)
  for name, got, clean in zip("qkv", grads, clean_grads):
    assert np.isfinite(np.asarray(got)).all(), f"d{name} is not finite"
    np.testing.assert_allclose(got, clean, rtol=1e-6, atol=1e-7, err_msg=f"d{name}")


# ---- Through the layer: a reset slot over a cache still holding NaN -------------------------


@nnx.jit(static_argnames="mode")
def _step(model, x, mode, slots=None):
  return model(x, model_mode=mode, slots=slots)


def test_reset_slot_decodes_like_a_fresh_cache_despite_stale_nan():
  """decode_attention=dot_product (the contiguous cache's reference path): slot 1 is reset and
  its entries filled with NaN / +inf (as if reset had not cleared them); the new sequence's
  continued prefill and its decode steps equal those of a cache that never held anything."""
  config = load_config("tiny", "decode_attention=dot_product")
  old, new = (jax.random.normal(jax.random.key(s), (2, 8, config.emb_dim), jnp.float32)
              for s in (2, 3))  # [B, T, D]

  def serve(model, reset_nan):
    """Slot 1's outputs [T, D]: prompt in two 3-token chunks (the second reads the cache),
    then two decode steps of both slots; both models make the same calls (each compiles once)."""
    cache = model.init_cache(2, 16)
    if reset_nan:
      for slot in (0, 1):
        _step(model, old[slot:slot + 1, :3], "prefill", slots=jnp.array([slot]))
      _step(model, old[:, 3:4], "autoregressive")
      cache.reset(1)
      batch_axis = cache.axis_order.index(0)
      slot1 = tuple(1 if a == batch_axis else slice(None) for a in range(4))
      cache.key[...] = cache.key[...].at[slot1].set(jnp.nan)
      cache.value[...] = cache.value[...].at[slot1].set(jnp.inf)
    outs = [_step(model, new[1:2, part], "prefill", slots=jnp.array([1]))[0]
            for part in (slice(0, 3), slice(3, 6))]
    outs += [_step(model, new[:, t:t + 1], "autoregressive")[1] for t in (6, 7)]
    return np.concatenate(outs)  # [8, D]

  got = serve(Attention(config, rngs=nnx.Rngs(0)), reset_nan=True)
  want = serve(Attention(config, rngs=nnx.Rngs(0)), reset_nan=False)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
