"""Prefill / autoregressive modes over the KV cache equal the train-mode forward.

Prefill of P tokens then T-P single-token decode steps must reproduce the
train forward over the same T tokens at the same positions: f32 to 1e-5; a
quantized cache within its stated bound (int8: max error < 2e-2 of max |ref|;
int4: < 0.25, 7 levels per sign). Swept over MHA/GQA/MQA, every attention
type, soft cap, sinks, cache layouts and quantization settings.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st

from meshattn.kvcache import KVQuant
from meshattn.layers import Attention, MaskSpec, RopeSpec
from meshattn.layers.serving import StepRejected, raise_if_rejected

EMB = 32
QUANT_BOUND = {None: 1e-5, "int8": 2e-2, "int4": 0.25}
MASKS = {
    "global": MaskSpec("global"),
    "window": MaskSpec("local_sliding", window=3),
    "chunk": MaskSpec("chunk", chunk=4),
    "full": None,  # bidirectional attention has no causal decode; not swept
}


def build(kv_heads=2, seed=0, **kw):
  return Attention(rngs=nnx.Rngs(seed), emb_dim=EMB, num_query_heads=4, num_kv_heads=kv_heads,
                   head_dim=8, **kw)


def tokens(batch, length, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, length, EMB))  # [B, T, D]


@nnx.jit(static_argnames="mode")
def run(model, x, mode, segment_ids=None, slots=None):
  """One jitted call of the layer (compiled once per configuration and shape)."""
  return model(x, decoder_segment_ids=segment_ids, model_mode=mode, slots=slots)


def prefill_then_decode(model, x, prompt_len, max_length=16):
  """Outputs [B, T, D] of prefill(x[:, :P]) followed by decode steps over the rest."""
  model.init_cache(x.shape[0], max_length)
  outs = [run(model, x[:, :prompt_len], "prefill")]
  for t in range(prompt_len, x.shape[1]):
    outs.append(run(model, x[:, t:t + 1], "autoregressive"))
  return jnp.concatenate(outs, axis=1)


def max_rel_err(got, want):
  return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


@nnx.jit
def train(model, x):
  return model(x, model_mode="train")


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mask", ["global", "window", "chunk"])
def test_prefill_decode_equals_train(kv_heads, mask):
  """With soft cap and sinks on; test_plain_prefill_decode_equals_train covers them off."""
  model = build(kv_heads, mask=MASKS[mask], attn_logits_soft_cap=3.0, attention_sink=True)
  model.sinks[...] = jnp.linspace(-1.0, 1.0, 4)
  x = tokens(2, 10)
  want = train(model, x)
  got = prefill_then_decode(model, x, prompt_len=4)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_llama4_layers_prefill_decode_equal_train():
  """A NoPE layer with temperature tuning (floor_scale 2: the query scale changes every other
  position, so decode must use the cache position) and a RoPE layer with the weightless L2 QK
  norm and chunked attention."""
  x = tokens(2, 8)  # positions 0..7: five temperature scales
  nope = build(2, rope=RopeSpec("none"), temperature_tuning=True, temperature_tuning_scale=0.5,
               temperature_tuning_floor_scale=2.0)
  rope = build(2, use_qk_norm=True, qk_norm_type="l2", mask=MASKS["chunk"])
  for model in (nope, rope):
    np.testing.assert_allclose(prefill_then_decode(model, x, prompt_len=4), train(model, x),
                               rtol=1e-5, atol=1e-5)


def test_plain_prefill_decode_equals_train():
  model = build(2)
  x = tokens(2, 10)
  np.testing.assert_allclose(prefill_then_decode(model, x, prompt_len=7), train(model, x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order, quant, quant_axis", [
    ((0, 1, 2, 3), None, None), ((1, 2, 0, 3), None, None), ((2, 0, 1, 3), None, None),
    ((0, 2, 1, 3), None, None), ((0, 1, 2, 3), "int8", "dkv"), ((1, 2, 0, 3), "int8", "heads_and_dkv"),
    ((2, 0, 1, 3), "int4", "dkv"), ((0, 1, 2, 3), "int4", "heads_and_dkv")])
def test_layouts_and_quantization(order, quant, quant_axis):
  kv_quant = KVQuant(quant, quant_axis) if quant else None
  model = build(2, mask=MASKS["window"], ar_cache_axis_order=order, kv_quant=kv_quant)
  x = tokens(2, 10)
  want = train(model, x)
  got = prefill_then_decode(model, x, prompt_len=5)
  err = max_rel_err(got, want)
  assert err < QUANT_BOUND[quant], err
  if quant:
    assert err > 1e-6  # the cache really is quantized
    assert model.cache.key[...].dtype == jnp.dtype(quant)


def test_every_layout_gives_identical_results():
  x = tokens(2, 9)
  results = []
  for order in [(0, 1, 2, 3), (1, 2, 0, 3), (3, 2, 1, 0)]:
    model = build(1, ar_cache_axis_order=order, kv_quant=KVQuant("int8"))
    results.append(prefill_then_decode(model, x, prompt_len=3))
  for other in results[1:]:
    np.testing.assert_array_equal(results[0], other)


def test_chunked_prefill_equals_one_shot():
  x = tokens(2, 11)
  one = build(2, mask=MASKS["window"])
  one.init_cache(2, 16)
  want = run(one, x, "prefill")
  chunked = build(2, mask=MASKS["window"], use_chunked_prefill=True, prefill_chunk_size=3)
  chunked.init_cache(2, 16)
  got = run(chunked, x, "prefill")
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  for a, b in zip(chunked.cache.read_all(jnp.float32), one.cache.read_all(jnp.float32)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(chunked.cache.lengths[...], one.cache.lengths[...])
  # Calling prefill twice (the caller chunks) continues the sequence too.
  manual = build(2, mask=MASKS["window"])
  manual.init_cache(2, 16)
  parts = [run(manual, x[:, :4], "prefill"), run(manual, x[:, 4:], "prefill")]
  np.testing.assert_allclose(jnp.concatenate(parts, 1), want, rtol=1e-6, atol=1e-6)


def test_ring_buffer_equals_full_cache_and_is_bounded():
  x = tokens(2, 12)
  ring = build(2, mask=MaskSpec("local_sliding", window=4))
  full = build(2, mask=MaskSpec("local_sliding", window=4), sliding_window_ring_buffer=False)
  got = prefill_then_decode(ring, x, prompt_len=6)
  want = prefill_then_decode(full, x, prompt_len=6)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert ring.cache.capacity == 4 and full.cache.capacity == 16
  assert ring.cache.key[...].shape[1] == 4  # memory bounded by the window


def test_ragged_prefill_with_padding_then_decode():
  """Prompts of lengths 2, 5 and 3 in one right-padded prefill; every row then
  decodes at its own position and matches its own single-sequence run."""
  lengths = [2, 5, 3]
  steps = 3
  model = build(2, mask=MASKS["chunk"], attention_sink=True)
  prompts = tokens(3, 5, seed=2)
  seg = (jnp.arange(5)[None] < jnp.array(lengths)[:, None]).astype(jnp.int32)  # [B, P]
  new = tokens(3, steps, seed=3)
  model.init_cache(3, 16)
  prefill_out = run(model, prompts, "prefill", segment_ids=seg)
  decoded = [run(model, new[:, i:i + 1], "autoregressive") for i in range(steps)]
  np.testing.assert_array_equal(model.cache.lengths[...], np.array(lengths) + steps)
  # Each row's own sequence (prompt, then its decoded tokens), zero-filled at the end to one
  # length: attention is causal (chunk mask), so the fill cannot change positions
  # < n + steps, and one jitted train call serves every row (not one eager call per length).
  pad = [((0, prompts.shape[1] - n), (0, 0)) for n in lengths]
  sequences = jnp.stack([jnp.pad(jnp.concatenate([prompts[b, :n], new[b]]), pad[b])
                         for b, n in enumerate(lengths)])  # [B, P + steps, D]
  wants = train(model, sequences)
  for b, n in enumerate(lengths):
    want = wants[b:b + 1]
    np.testing.assert_allclose(prefill_out[b, :n], want[0, :n], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(prefill_out[b, n:], 0.0)  # padding rows output zeros
    for i in range(steps):
      np.testing.assert_allclose(decoded[i][b, 0], want[0, n + i], rtol=1e-5, atol=1e-5)


@settings(max_examples=4, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(1, 6), min_size=3, max_size=3), seed=st.integers(0, 1000))
def test_ragged_decode_matches_single_sequence_runs(lengths, seed):
  """Slots of different lengths (prefilled one by one through `slots`, padded to
  one shape) decode in one batched call; each row equals decoding that
  sequence alone."""
  model = build(1)
  batch = len(lengths)
  prompts = tokens(batch, 6, seed=seed)
  step_tokens = tokens(batch, 2, seed=seed + 1)
  model.init_cache(batch, 12)
  for b, n in enumerate(lengths):
    seg = (jnp.arange(6) < n).astype(jnp.int32)[None]  # [1, 6]: n real tokens
    run(model, prompts[b:b + 1], "prefill", segment_ids=seg, slots=jnp.array([b]))
  np.testing.assert_array_equal(model.cache.lengths[...], lengths)
  batched = [run(model, step_tokens[:, i:i + 1], "autoregressive") for i in range(2)]
  for b, n in enumerate(lengths):
    alone = build(1)
    alone.init_cache(1, 12)
    run(alone, prompts[b:b + 1, :n], "prefill")
    for i in range(2):
      want = run(alone, step_tokens[b:b + 1, i:i + 1], "autoregressive")
      np.testing.assert_allclose(batched[i][b], want[0], rtol=1e-5, atol=1e-5)


def test_insert_and_reset_round_trip():
  """Continuous batching: a prompt prefilled in a separate (prefill-layout)
  cache is inserted into a running decode batch and decodes exactly as if it
  had been prefilled in place; a reset slot reads as empty."""
  x = tokens(2, 8)
  layer = build(2, prefill_cache_axis_order=(1, 2, 0, 3), ar_cache_axis_order=(2, 0, 1, 3))
  prefill_cache = layer.init_cache(1, 16, for_prefill=True)
  run(layer, x[1:2, :5], "prefill")
  decode_cache = layer.init_cache(2, 16)
  run(layer, x[0:1, :3], "prefill", slots=jnp.array([0]))
  decode_cache.insert(1, prefill_cache, 0)
  np.testing.assert_array_equal(decode_cache.lengths[...], [3, 5])
  out = run(layer, x[:, 6:7], "autoregressive")

  in_place = build(2)
  in_place.init_cache(2, 16)
  run(in_place, x[0:1, :3], "prefill", slots=jnp.array([0]))
  run(in_place, x[1:2, :5], "prefill", slots=jnp.array([1]))
  np.testing.assert_allclose(out, run(in_place, x[:, 6:7], "autoregressive"), rtol=1e-6,
                             atol=1e-6)

  decode_cache.reset(1)
  np.testing.assert_array_equal(decode_cache.lengths[...], [4, 0])
  idle = run(layer, x[:, 7:8], "autoregressive")
  np.testing.assert_array_equal(idle[1], 0.0)  # an empty slot outputs zeros and stays empty
  np.testing.assert_array_equal(decode_cache.lengths[...], [5, 0])


def snapshot(cache):
  return [np.asarray(v) for v in jax.tree.leaves(nnx.state(cache))]


def assert_unchanged(before, cache):
  for a, b in zip(before, snapshot(cache)):
    np.testing.assert_array_equal(a, b)


def test_errors_leave_the_cache_consistent():
  model = build(2)
  x = tokens(2, 6)
  cache = model.init_cache(2, 6)
  model(x[:, :5], model_mode="prefill")
  before = snapshot(cache)
  with pytest.raises(ValueError, match="max_length=6"):
    model(x[:, :2], model_mode="prefill")  # 5 + 2 > 6
  assert_unchanged(before, cache)
  with pytest.raises(ValueError, match=r"slot index out of range.*\[0, 2\)"):
    model(x[:1, :1], model_mode="prefill", slots=jnp.array([2]))
  with pytest.raises(ValueError, match="slot index out of range"):
    cache.reset(-1)
  assert_unchanged(before, cache)
  with pytest.raises(ValueError, match="batch_size"):
    model(x[:1, :1], model_mode="autoregressive")
  with pytest.raises(ValueError, match="one token"):
    model(x[:, :2], model_mode="autoregressive")
  with pytest.raises(ValueError, match="mask"):
    model(x[:, :1], model_mode="autoregressive", mask=jnp.ones((1, 1, 1, 1), bool))
  with pytest.raises(ValueError, match="right padding only"):
    model(x[:1, :3], decoder_segment_ids=jnp.array([[0, 1, 1]]), model_mode="prefill",
          slots=jnp.array([1]))  # left padding
  assert_unchanged(before, cache)
  fresh = build(2)
  with pytest.raises(ValueError, match="init_cache"):
    fresh(x[:, :1], model_mode="prefill")


def test_overflow_under_jit_raises_and_keeps_state():
  model = build(2)
  model.init_cache(2, 4)
  x = tokens(2, 4)

  @nnx.jit
  def decode(model, x):
    return model(x, model_mode="autoregressive")

  model(x[:, :3], model_mode="prefill")
  decode(model, x[:, 3:4])  # fills the cache to max_length
  before = snapshot(model.cache)
  if jax.default_backend() == "cpu":
    # One CPU device: the host callback fails the call at once (docs/serving.md).
    with pytest.raises(Exception, match="max_length=4"):
      jax.block_until_ready(decode(model, x[:, :1]))
  else:
    # On an accelerator nothing raises inside the step; the caller reads the bits.
    out = jax.block_until_ready(decode(model, x[:, :1]))
    np.testing.assert_array_equal(np.asarray(out), 0.0)  # a rejected step outputs zeros
    with pytest.raises(StepRejected, match="max_length=4"):
      raise_if_rejected(model)
  assert_unchanged(before, model.cache)
  raise_if_rejected(model)  # the bits were reported once and cleared
