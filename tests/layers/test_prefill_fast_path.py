"""Prefill of fresh prompts runs the train kernel and equals the cached path.

When every slot of a prefill call is empty, the prompt attends only over
itself at positions 0..T-1, so the layer runs the configured train-mode
kernel over the prompt (flash on GPU/TPU; here dot_product / blockwise)
instead of the blockwise pass over the whole cache. The reference is the
same layer with that fast path switched off (`CachedOnly`): outputs must
match to 1e-5 in f32, the cache must end in the same state, and the decode
steps that follow must match too. Which branch ran is checked without
timing: eagerly by a train kernel that raises, under jit by a kernel whose
debug callback only fires when its `lax.cond` branch runs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.kvcache import KVQuant
from meshattn.layers import Attention, MaskSpec
from meshattn.layers.kernels.train import blockwise, dot_product
from meshattn.layers.kernels import registry
from meshattn.sharding import create_mesh, shard_module

EMB = 32
TOL = dict(rtol=1e-5, atol=1e-5)
MASKS = {
    "global": MaskSpec("global"),
    "window": MaskSpec("local_sliding", window=3),  # ring buffer of 3 < prompt length
    "chunk": MaskSpec("chunk", chunk=4),
    "full": MaskSpec("full"),
}
KERNEL_MODULES = {"dot_product": (dot_product, "dot_product_attention"),
                  "blockwise": (blockwise, "blockwise_attention")}


class CachedOnly(Attention):
  """The reference: prefill always takes the cached path (the layer before the fast path)."""

  def _fresh_prefill_attention(self, *args, **kwargs):
    return None


def build(cls=Attention, kv_heads=2, mask="global", mesh=None, **kw):
  model = cls(rngs=nnx.Rngs(0), mesh=mesh, emb_dim=EMB, num_query_heads=4, num_kv_heads=kv_heads,
              head_dim=8, mask=MASKS[mask], **kw)
  if model.settings.attention_sink:
    model.sinks[...] = jnp.linspace(-1.0, 1.0, 4)
  return model


def tokens(batch, length, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, length, EMB))  # [B, T, D]


def right_padded(lengths, length):
  return (jnp.arange(length)[None] < jnp.asarray(lengths)[:, None]).astype(jnp.int32)  # [B, T]


@nnx.jit(static_argnames="mode")
def run(model, x, mode, segment_ids=None, slots=None):
  return model(x, decoder_segment_ids=segment_ids, model_mode=mode, slots=slots)


def assert_same_cache(got, want):
  for a, b in zip(jax.tree.leaves(nnx.state(got)), jax.tree.leaves(nnx.state(want))):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **TOL)
  np.testing.assert_array_equal(got.lengths[...], want.lengths[...])


def serve(model, x, seg, steps=3, max_length=16, slots=None, cache_batch=None):
  """Prefill x [B, P, D] then `steps` decode steps: outputs [B, P + steps, D]."""
  cache = model.init_cache(cache_batch or x.shape[0], max_length)
  rows = jnp.arange(x.shape[0]) if slots is None else slots
  if model.settings.paged_kv_cache:
    cache.reserve_for_step(rows, x.shape[1] + steps)
  outs = [run(model, x, "prefill", seg, slots)]
  new = tokens(x.shape[0], steps, seed=7)
  for i in range(steps):
    outs.append(run(model, new[:, i:i + 1], "autoregressive", None, slots))
  return jnp.concatenate(outs, axis=1)


def compare(steps=3, x=None, seg=None, slots=None, cache_batch=None, **kw):
  """Serve the same prompts with and without the fast path: same outputs, same cache."""
  x = tokens(3, 10) if x is None else x
  seg = right_padded([10, 4, 7][:x.shape[0]], x.shape[1]) if seg is None else seg
  fast, ref = build(**kw), build(CachedOnly, **kw)
  got = serve(fast, x, seg, steps, slots=slots, cache_batch=cache_batch)
  want = serve(ref, x, seg, steps, slots=slots, cache_batch=cache_batch)
  np.testing.assert_allclose(got, want, **TOL)
  assert_same_cache(fast.cache, ref.cache)
  return fast, got


# Every mask, both kernels and MHA / GQA / MQA, each pair covered without the full product
# (each case compiles a prefill and a decode program for two layers).
CASES = [("dot_product", 4, "global"), ("blockwise", 2, "global"), ("dot_product", 1, "window"),
         ("blockwise", 2, "window"), ("blockwise", 1, "chunk"), ("dot_product", 2, "chunk"),
         ("dot_product", 4, "full"), ("blockwise", 1, "full")]


@pytest.mark.parametrize("attention, kv_heads, mask", CASES,
                         ids=[f"{a}-{k}kv-{m}" for a, k, m in CASES])
def test_fresh_prefill_equals_cached_path(attention, kv_heads, mask):
  """Right-padded rows, soft cap and sinks; then decode (not for bidirectional layers)."""
  _, got = compare(steps=0 if mask == "full" else 3, attention=attention, kv_heads=kv_heads,
                   mask=mask, attn_logits_soft_cap=3.0, attention_sink=True)
  seg = right_padded([10, 4, 7], 10)
  np.testing.assert_array_equal(np.asarray(got[:, :10])[np.asarray(seg) == 0], 0.0)


def test_window_without_ring_buffer():
  compare(mask="window", sliding_window_ring_buffer=False)


@pytest.mark.parametrize("attention", ["dot_product", "blockwise"])
def test_slot_subset(attention):
  """Prefill two rows into slots [3, 1] of a 4-slot cache; the other slots stay empty."""
  x = tokens(2, 9)
  fast, _ = compare(x=x, seg=right_padded([9, 5], 9), slots=jnp.array([3, 1]), cache_batch=4,
                    attention=attention, mask="chunk")
  np.testing.assert_array_equal(fast.cache.lengths[...], [0, 5 + 3, 0, 9 + 3])


def test_quantized_cache():
  """The cached path attends over the step's own (unquantized) keys/values, not
  over what it writes, so on an empty slot both paths see full-precision K/V:
  the prefill matches to 1e-5; the int8 cache they write is the same, so the
  decode steps that read it back match too."""
  compare(kv_heads=1, mask="window", kv_quant=KVQuant("int8"), attention_sink=True)


def test_paged_cache():
  compare(paged_kv_cache=True, num_pages=16, tokens_per_page=4, attn_logits_soft_cap=2.0)


def test_chunked_prefill_first_chunk():
  """With chunked prefill the first chunk of a fresh prompt runs the train kernel."""
  x = tokens(2, 11)
  seg = right_padded([11, 6], 11)
  fast = build(mask="window", use_chunked_prefill=True, prefill_chunk_size=4)
  ref = build(CachedOnly, mask="window")
  np.testing.assert_allclose(serve(fast, x, seg), serve(ref, x, seg), **TOL)
  assert_same_cache(fast.cache, ref.cache)


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "eager"])
def test_prefill_on_non_empty_slots_takes_cached_path(use_jit):
  """A second prefill continues the slots (cached path) and equals one train call
  over the whole sequence; a call mixing a non-empty and an empty slot too."""
  call = run if use_jit else (lambda m, x, mode, seg=None: m(x, decoder_segment_ids=seg,
                                                               model_mode=mode))
  model = build(mask="window", attention_sink=True)
  x = tokens(2, 9)
  model.init_cache(2, 16)
  # Row 1 is all padding: its slot stays empty for the second call.
  first = call(model, x[:, :4], "prefill", right_padded([4, 0], 4))
  second = call(model, x[:, 4:], "prefill", right_padded([5, 5], 5))
  np.testing.assert_array_equal(model.cache.lengths[...], [9, 5])
  want = model(x, model_mode="train")  # [2, 9, D]
  np.testing.assert_allclose(jnp.concatenate([first[:1], second[:1]], axis=1), want[:1], **TOL)
  np.testing.assert_allclose(second[1], model(x[1:, 4:], model_mode="train")[0], **TOL)


def spy_on_kernel(monkeypatch, attention, action):
  """Replace the train kernel by one that calls action() first (eagerly or when traced)."""
  module, name = KERNEL_MODULES[attention]
  real = getattr(module, name)

  def spy(*args, **kwargs):
    action()
    return real(*args, **kwargs)

  monkeypatch.setattr(module, name, spy)


class TrainKernelCalled(Exception):
  pass


def refuse():
  raise TrainKernelCalled


@pytest.mark.parametrize("attention", ["dot_product", "blockwise"])
def test_eager_fresh_prefill_calls_the_train_kernel(monkeypatch, attention):
  model = build(attention=attention)
  x = tokens(2, 6)
  cache = model.init_cache(2, 16)
  model(x[:1, :3], model_mode="prefill", slots=jnp.array([0]))  # slot 0 non-empty, slot 1 empty
  before = [np.asarray(v) for v in jax.tree.leaves(nnx.state(cache))]
  spy_on_kernel(monkeypatch, attention, refuse)
  with pytest.raises(TrainKernelCalled):
    model(x[1:, :3], model_mode="prefill", slots=jnp.array([1]))
  for a, b in zip(before, jax.tree.leaves(nnx.state(cache))):  # restored on error
    np.testing.assert_array_equal(a, b)
  if attention == "dot_product":
    # Slot 0 is not empty: the reference cached path, not the (untiled) train kernel.
    model(x[:, 3:], model_mode="prefill")
    np.testing.assert_array_equal(cache.lengths[...], [6, 3])
  else:  # a tiled kernel also serves non-empty slots, over the whole slot (prefill_attention)
    with pytest.raises(TrainKernelCalled):
      model(x[:, 3:], model_mode="prefill")


def test_jit_runs_only_the_taken_branch(monkeypatch):
  ran = []
  spy_on_kernel(monkeypatch, "dot_product", lambda: jax.debug.callback(lambda: ran.append(1)))
  step = nnx.jit(lambda model, x: model(x, model_mode="prefill"))  # traced with the spy
  model = build()
  x = tokens(2, 6)
  model.init_cache(2, 16)
  first = jax.block_until_ready(step(model, x[:, :3]))
  assert ran, "fresh slots: the train kernel's branch ran"
  ran.clear()
  second = jax.block_until_ready(step(model, x[:, 3:]))
  assert not ran, "non-empty slots: only the cached branch ran"
  np.testing.assert_allclose(jnp.concatenate([first, second], axis=1),
                             model(x, model_mode="train"), **TOL)


def cached_prefill(x, segment_ids=None, **kw):
  """The reference: prefill x on a fresh cache through the cached path."""
  model = build(CachedOnly, **kw)
  model.init_cache(x.shape[0], 16)
  return model(x, decoder_segment_ids=segment_ids, model_mode="prefill")


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "eager"])
def test_kernel_refusing_the_inputs_falls_back(monkeypatch, use_jit):
  """A kernel that cannot take the shapes (ValueError while tracing, like splash
  with a length that is not a multiple of 128) leaves the cached path."""
  def too_short():
    raise ValueError("needs q_len to be a multiple of 128")

  spy_on_kernel(monkeypatch, "dot_product", too_short)
  x = tokens(2, 6)
  model = build(mask="chunk")
  model.init_cache(2, 16)
  got = run(model, x, "prefill") if use_jit else model(x, model_mode="prefill")
  np.testing.assert_allclose(got, cached_prefill(x, mask="chunk"), **TOL)


def test_full_attention_without_segment_ids_support(monkeypatch):
  """Padding keys of a bidirectional prompt are excluded by segment ids; a train
  kernel without them (nor user masks, which the whole-slot path would use) leaves
  padded prompts to the cached path."""
  monkeypatch.setattr(registry, "_REGISTRY", [
      dataclasses.replace(k, features=k.features - {"segment_ids", "user_mask"})
      if k.name == "blockwise" else k for k in registry._REGISTRY])
  spy_on_kernel(monkeypatch, "blockwise", refuse)
  x = tokens(2, 6)
  model = build(attention="blockwise", mask="full")
  model.init_cache(2, 16)
  seg = right_padded([6, 3], 6)
  got = model(x, decoder_segment_ids=seg, model_mode="prefill")
  np.testing.assert_allclose(got, cached_prefill(x, seg, mask="full"), **TOL)
  model.cache.reset(jnp.arange(2))
  with pytest.raises(TrainKernelCalled):  # no padding: no segment ids needed, the fast path runs
    model(x, model_mode="prefill")


@pytest.mark.parametrize("use_jit", [True, False], ids=["jit", "eager"])
def test_overflow_is_refused_and_keeps_the_cache(use_jit):
  model = build()
  cache = model.init_cache(2, 8)
  x = tokens(2, 10)
  before = [np.asarray(v) for v in jax.tree.leaves(nnx.state(cache))]
  with pytest.raises(Exception, match="max_length=8"):
    jax.block_until_ready(run(model, x, "prefill") if use_jit else model(x, model_mode="prefill"))
  for a, b in zip(before, jax.tree.leaves(nnx.state(cache))):
    np.testing.assert_array_equal(a, b)


AXES = ("data", "fsdp", "context", "tensor", "autoregressive")


@pytest.mark.parametrize("sizes, attention", [
    (dict(data=2, tensor=4), "dot_product"), (dict(data=2, context=2, tensor=2), "dot_product"),
    (dict(fsdp=2, context=4), "blockwise")], ids=["d2t4", "d2c2t2", "f2c4-blockwise"])
def test_sharded_fresh_prefill_equals_single_device(sizes, attention):
  """On the 8-device mesh (kv heads 2 on tensor 4: the GQA repeat rule; context
  shards the prompt length) the fast path equals the one-device cached path."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  mesh = create_mesh({"mesh_axes": AXES, **{f"ici_{a}_parallelism": sizes.get(a, 1) for a in AXES}})
  kw = dict(mask="window", attention=attention, attention_sink=True, attn_logits_soft_cap=3.0)
  x = tokens(4, 8)
  seg = right_padded([8, 2, 5, 7], 8)
  ref = build(CachedOnly, **kw)
  want = serve(ref, x, seg, steps=2)
  model = build(mesh=mesh, **kw)
  shard_module(model, mesh, model.settings.logical_axis_rules)
  got = serve(model, x, seg, steps=2)
  np.testing.assert_allclose(got, want, **TOL)
  assert_same_cache(model.cache, ref.cache)
