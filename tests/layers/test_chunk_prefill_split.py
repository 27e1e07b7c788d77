"""A prefill chunk on non-empty slots as two partial passes merged by their LSEs (issue 20).

The split path (layers/prefill_split.py) must equal the float64 NumPy
softmax over the slot's cached entries + the chunk, the block-by-block
reference path and the whole-slot path, for rows with different cached
lengths (0 and a slot the chunk fills), right padding (a row with no valid
token writes nothing), MHA / GQA / MQA, sinks, f32 and bf16. On CPU the XLA
reference partial kernel stands in for cuDNN (same contract); the GPU test
runs cuDNN itself against it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.kvcache import KVCache, KVQuant
from meshattn.kvcache.step_checks import StepRejected
from meshattn.layers import Attention
from meshattn.layers import prefill_split, score_mods
from meshattn.layers.cached_step import cached_step, step_positions
from meshattn.layers.kernels import dispatch
from meshattn.layers.kernels.train import partial_attention as partial
from meshattn.layers.masks import MaskSpec
from meshattn.layers.prefill_attention import whole_slot_attention
from meshattn.layers.serving import jit_step
from meshattn.sharding import create_mesh, shard_module

CAPACITY, CHUNK, HEAD_DIM = 16, 4, 8
CACHED = np.array([0, 5, 12, 9])  # slot 2 ends full (12 + 4 = 16)
NEW = np.array([4, 2, 4, 0])  # right padding; slot 3's row has no token (writes nothing)


def filled_cache(kv_heads, dtype, seed=0):
  """A [4, 16] cache holding CACHED tokens per slot and NaN in every entry past them."""
  cache = KVCache(4, CAPACITY, kv_heads, HEAD_DIM, dtype=dtype)
  rng = np.random.default_rng(seed)
  k_all, v_all = (rng.standard_normal((4, CAPACITY, kv_heads, HEAD_DIM)) for _ in range(2))
  present = np.arange(CAPACITY)[None, :, None, None] < CACHED[:, None, None, None]
  cache.key[...] = jnp.asarray(np.where(present, k_all, np.nan), dtype)
  cache.value[...] = jnp.asarray(np.where(present, v_all, np.nan), dtype)
  cache.lengths[...] = jnp.asarray(CACHED, jnp.int32)
  return cache, k_all, v_all


def numpy_attention(q, k_all, v_all, k_new, v_new, scale, sinks):
  """float64: row b's query t sees cached entries < CACHED[b] and new tokens <= t."""
  b, t, n, _ = q.shape
  group = n // k_all.shape[2]
  out = np.zeros(q.shape)
  for r in range(b):
    keys = np.concatenate([k_all[r, :CACHED[r]], k_new[r, :NEW[r]]])  # [S, K, H]
    vals = np.concatenate([v_all[r, :CACHED[r]], v_new[r, :NEW[r]]])
    for i in range(NEW[r]):
      seen = CACHED[r] + i + 1
      for h in range(n):
        logits = keys[:seen, h // group] @ q[r, i, h] * scale  # [seen]
        peak = logits.max() if sinks is None else max(logits.max(), sinks[h])
        w = np.exp(logits - peak)
        total = w.sum() + (0.0 if sinks is None else np.exp(sinks[h] - peak))
        out[r, i, h] = w @ vals[:seen, h // group] / total
  return out


def step_inputs(num_heads, kv_heads, dtype, seed=1):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((4, CHUNK, num_heads, HEAD_DIM))
  k, v = (rng.standard_normal((4, CHUNK, kv_heads, HEAD_DIM)) for _ in range(2))
  valid = np.arange(CHUNK)[None, :] < NEW[:, None]  # [4, T]
  # Padding tokens hold NaN: they must reach neither an output nor the cache.
  q, k, v = (np.where(valid[:, :, None, None], x, np.nan) for x in (q, k, v))
  return q, k, v, jnp.asarray(valid)


def run_step(cache, q, k, v, valid, dtype, settings, sinks, **paths):
  """One cached_step on `cache` (compiled once, as a serving step runs it)."""
  options = dispatch.kernel_options(settings)

  @nnx.jit
  def step(cache, q, k, v, valid, sinks):
    rows = jnp.arange(4, dtype=jnp.int32)
    return cached_step(cache, rows, q, k, v, positions=step_positions(cache, rows, CHUNK),
                       valid=valid, options=options, sinks=sinks, **paths)  # [4, T, N, H]

  return step(cache, *(jnp.asarray(x, dtype) for x in (q, k, v)), valid, sinks)


CASES = {"mha-f32": (4, 4, jnp.float32, False), "gqa-bf16-sinks": (4, 2, jnp.bfloat16, True),
         "mqa-f32-sinks": (4, 1, jnp.float32, True)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_split_equals_numpy_and_both_other_paths(case):
  num_heads, kv_heads, dtype, with_sinks = CASES[case]
  layer = Attention(emb_dim=32, num_query_heads=num_heads, num_kv_heads=kv_heads,
                    head_dim=HEAD_DIM, attention="blockwise", dtype=dtype,
                    attention_sink=with_sinks, rngs=nnx.Rngs(0))
  s = layer.settings
  sinks = jnp.linspace(-1.0, 2.0, num_heads) if with_sinks else None
  q, k, v, valid = step_inputs(num_heads, kv_heads, dtype)

  def split(cache, rows, query, key, value, start, valid):  # split_chunk_attention's, on CPU
    k_old, v_old = cache.read_block(rows, 0, cache.capacity, query.dtype)  # [4, C, K, H]
    return prefill_split.split_attention(partial.reference_partial_attention, query, k_old, v_old,
                                         key, value, start=start, valid=valid, scale=s.scale,
                                         sinks=sinks)

  slot = whole_slot_attention(layer, s.axes["prefill"], sinks=sinks, lengths=(CHUNK, CAPACITY))
  got, block, whole = [], [], []
  for paths, out in ((dict(split_attention=split), got), (dict(), block),
                     (dict(slot_attention=slot), whole)):
    cache, k_all, v_all = filled_cache(kv_heads, dtype)
    out.append(run_step(cache, q, k, v, valid, dtype, settings=s, sinks=sinks, **paths))
    out.append(cache)
  as_stored = lambda x: np.asarray(jnp.asarray(x, dtype), np.float64)
  want = numpy_attention(*(as_stored(x) for x in (q, k_all, v_all, k, v)),
                         s.scale, None if sinks is None else np.asarray(sinks, np.float64))
  tol = dict(rtol=2e-5, atol=2e-5) if dtype == jnp.float32 else dict(rtol=0, atol=2e-2)
  context = np.asarray(got[0], np.float64)
  assert np.all(np.isfinite(context))
  np.testing.assert_array_equal(context[~np.asarray(valid)], 0.0)  # padding queries: zeros
  np.testing.assert_allclose(context, want, **tol)
  np.testing.assert_allclose(context, np.asarray(block[0], np.float64), **tol)
  np.testing.assert_allclose(context, np.asarray(whole[0], np.float64), **tol)
  cache = got[1]  # same writes as the reference path; nothing for the padding tokens
  np.testing.assert_array_equal(cache.lengths[...], CACHED + NEW)
  for name in ("key", "value"):
    np.testing.assert_array_equal(np.asarray(getattr(cache, name)[...], np.float32),
                                  np.asarray(getattr(block[1], name)[...], np.float32))


def test_merge_of_an_empty_part_is_exactly_the_other_part():
  """A row with nothing cached (lse_a = -inf) gives (b) bit for bit; both empty: zeros."""
  rng = np.random.default_rng(3)
  out_b = jnp.asarray(rng.standard_normal((2, 3, 4, 8)), jnp.bfloat16)
  lse_b = jnp.asarray(rng.standard_normal((2, 3, 4)) * 5, jnp.float32).at[1].set(-jnp.inf)
  out_a = jnp.full(out_b.shape, jnp.nan, jnp.bfloat16)  # an empty part's unspecified output
  lse_a = jnp.full(lse_b.shape, -jnp.inf)
  merged = partial.merge_partials(out_a, lse_a, out_b, lse_b)
  np.testing.assert_array_equal(merged[0], np.asarray(out_b[0], np.float32))
  np.testing.assert_array_equal(merged[1], 0.0)


def reference_for_blockwise(monkeypatch):
  """The split path with the XLA reference kernel for `attention=blockwise` layers
  (on the GPU: cuDNN for autoselected / flash); counts the traced partial calls."""
  calls = []

  def kernel(query, *args, **kwargs):
    calls.append((kwargs["causal"], query.dtype))
    return partial.reference_partial_attention(query, *args, **kwargs)

  monkeypatch.setattr(prefill_split, "partial_kernel",
                      lambda s: kernel if s.attention == "blockwise" else None)
  return calls


@jit_step
def prefill(model, x, seg):
  return model(x, decoder_segment_ids=seg, model_mode="prefill")


@jit_step
def decode(model, x):
  return model(x, model_mode="autoregressive")


def serve(model, x):
  """Fresh prefill (slot 2 stays empty), a ragged chunk on every slot, one decode step."""
  cache = model.init_cache(3, 12)
  if model.settings.paged_kv_cache:
    cache.reserve_for_step(np.arange(3), 12)
  first = prefill(model, x[:, :5], jnp.array([[1] * 5, [1] * 5, [0] * 5], jnp.int32))
  second = prefill(model, x[:, 5:9], jnp.array([[1] * 4, [1, 1, 0, 0], [1] * 4], jnp.int32))
  return first, second, decode(model, x[:, 9:10])


LAYER_CASES = {"gqa-sinks-paged": dict(num_kv_heads=2, attention_sink=True, paged_kv_cache=True,
                                       num_pages=9, tokens_per_page=4),
               "mqa-int8-bf16": dict(num_kv_heads=1, kv_quant=KVQuant("int8"), dtype=jnp.bfloat16),
               # all slots, stored in the compute dtype: the cache is read in place
               "gqa-contiguous": dict(num_kv_heads=2)}


def build(attention, mesh=None, **kw):
  model = Attention(emb_dim=32, num_query_heads=4, head_dim=HEAD_DIM, attention=attention,
                    decode_attention="dot_product", mesh=mesh, rngs=nnx.Rngs(0), **kw)
  if model.settings.attention_sink:
    model.sinks[...] = jnp.linspace(-1.0, 1.0, 4)
  return model


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_step_equals_the_reference_layer(case, monkeypatch):
  """Through jit_step: the same outputs and cache as the dot_product / dot_product layer."""
  calls = reference_for_blockwise(monkeypatch)
  in_place = []
  reads_in_place = prefill_split.reads_in_place
  monkeypatch.setattr(prefill_split, "reads_in_place",
                      lambda *a: in_place.append(reads_in_place(*a)) or in_place[-1])
  x = jax.random.normal(jax.random.key(1), (3, 10, 32))
  want_model = build("dot_product", **LAYER_CASES[case])
  want = serve(want_model, x)
  got_model = build("blockwise", **LAYER_CASES[case])
  got = serve(got_model, x)
  bf16 = "dtype" in LAYER_CASES[case]
  dtype = jnp.dtype(jnp.bfloat16 if bf16 else jnp.float32)
  assert sorted(set(calls)) == [(False, dtype), (True, dtype)], calls  # traced into the step
  assert set(in_place) == {case == "gqa-contiguous"}, in_place  # traced into both prefills
  tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=2e-5, atol=2e-5)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
  np.testing.assert_array_equal(got[1][1, 2:], 0.0)  # padding queries output zeros
  for a, b in zip(jax.tree.leaves(nnx.state(got_model.cache)),
                  jax.tree.leaves(nnx.state(want_model.cache))):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
  # A chunk that overflows slot 0 (10 + 4 > 12) is rejected: nothing written, lengths kept.
  cache = got_model.cache
  names = [name for name in ("key", "value", "key_pages", "value_pages", "key_scale",
                             "value_scale", "lengths") if hasattr(cache, name)]
  before = {name: np.asarray(getattr(cache, name)[...]) for name in names}
  with pytest.raises(StepRejected, match="max_length"):
    prefill(got_model, x[:, 5:9], jnp.ones((3, 4), jnp.int32))
  for name in names:
    np.testing.assert_array_equal(np.asarray(getattr(cache, name)[...]), before[name], name)


@pytest.mark.parametrize("sizes", [dict(data=2, fsdp=2, tensor=2), dict(data=2, tensor=4)],
                         ids=["d2f2t2", "d2t4"])
def test_sharded_split_equals_single_device(sizes, monkeypatch):
  """8 devices: batch and heads split (d2f2t2), or kv heads 2 on tensor=4, not split like
  the query heads, so every shard keeps all heads of its rows (d2t4): equals the
  one-device reference layer."""
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  calls = reference_for_blockwise(monkeypatch)
  axes = ("data", "fsdp", "context", "tensor", "autoregressive")
  mesh = create_mesh({"mesh_axes": axes, **{f"ici_{a}_parallelism": sizes.get(a, 1) for a in axes}})
  x = jax.random.normal(jax.random.key(2), (4, 10, 32))
  kw = dict(num_kv_heads=2, attention_sink=True)

  def run(model):
    model.init_cache(4, 12)
    first = prefill(model, x[:, :5], jnp.ones((4, 5), jnp.int32))
    return first, prefill(model, x[:, 5:9], jnp.array([[1] * 4, [1, 1, 0, 0]] * 2, jnp.int32))

  want = run(build("dot_product", **kw))
  model = build("blockwise", mesh=mesh, **kw)
  shard_module(model, mesh, model.settings.logical_axis_rules)
  got = run(model)
  assert calls, "the chunk step did not run the split path"
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


INEXACT_CASES = {  # the split is exact only for a global causal mask with plain logits
    "soft-cap": dict(attn_logits_soft_cap=5.0),
    "window": dict(mask=MaskSpec("local_sliding", window=3), sliding_window_ring_buffer=False),
    "chunk-mask": dict(mask=MaskSpec("chunk", chunk=4)),
    "score-mod": dict(score_mod=score_mods.alibi(4))}


@pytest.mark.parametrize("case", sorted(INEXACT_CASES))
def test_the_split_is_not_taken_where_it_is_not_exact(case, monkeypatch):
  calls = reference_for_blockwise(monkeypatch)
  serve(build("blockwise", **INEXACT_CASES[case]), jax.random.normal(jax.random.key(1), (3, 10, 32)))
  assert calls == [], f"{case}: the split path ran"


GPU_SHAPES = {  # chunk T, slot C, cached lengths (0 and a full slot), new tokens per row
    "aligned": (256, 1024, [0, 300, 1024, 777], [256, 100, 0, 256]),
    "odd": (77, 300, [0, 5, 300, 123], [77, 1, 0, 50])}


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs on the GPU only")
@pytest.mark.parametrize("shape", sorted(GPU_SHAPES))
def test_cudnn_partial_equals_the_reference_on_gpu(shape):
  """cuDNN (head_dim 128, bf16) against the XLA reference: both parts, lengths with 0 and
  full rows, GQA; then the whole split step (NaN in the entries past each row's start and
  in the padding tokens' q / k / v) against the reference split step."""
  assert partial.cudnn_partial_usable(), "cuDNN partial attention did not pass its check"
  rng = np.random.default_rng(0)
  t, c, cached, new = GPU_SHAPES[shape]
  b, n, k, h = 4, 8, 2, 128
  q, k_old, v_old, k_new, v_new = (
      jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
      for shape in ((b, t, n, h), (b, c, k, h), (b, c, k, h), (b, t, k, h), (b, t, k, h)))
  start, n_new = jnp.array(cached, jnp.int32), jnp.array(new, jnp.int32)
  valid = jnp.arange(t)[None, :] < n_new[:, None]
  real = np.asarray(valid)[..., None]  # [b, T, 1]
  for key, value, kv_len, causal in ((k_old, v_old, start, False), (k_new, v_new, n_new, True)):
    kw = dict(q_lengths=n_new, kv_lengths=kv_len, causal=causal, scale=h ** -0.5)
    got = jax.jit(functools.partial(partial.cudnn_partial_attention, **kw))(q, key, value)
    want = jax.jit(functools.partial(partial.reference_partial_attention, **kw))(q, key, value)
    seen = real & np.isfinite(np.asarray(want[1]))  # [b, T, N]: out is unspecified elsewhere
    np.testing.assert_allclose(np.where(seen[..., None], np.asarray(got[0], np.float32), 0),
                               np.where(seen[..., None], want[0], 0), atol=2e-2, rtol=0)
    np.testing.assert_allclose(np.where(real, got[1], 0), np.where(real, want[1], 0),
                               atol=1e-2, rtol=0)  # -inf (no key) must match too
  sinks = jnp.linspace(-1.0, 1.0, n)
  stale = (jnp.arange(c)[None, :] >= start[:, None])[:, :, None, None]  # [b, C, 1, 1]
  k_old, v_old = (jnp.where(stale, jnp.nan, x).astype(x.dtype) for x in (k_old, v_old))
  padding = ~valid[:, :, None, None]  # [b, T, 1, 1]
  q, k_new, v_new = (jnp.where(padding, jnp.nan, x).astype(x.dtype) for x in (q, k_new, v_new))
  step = lambda kernel: jax.jit(functools.partial(
      prefill_split.split_attention, kernel, start=start, valid=valid, scale=h ** -0.5,
      sinks=sinks))(q, k_old, v_old, k_new, v_new)
  got, want = step(partial.cudnn_partial_attention), step(partial.reference_partial_attention)
  assert np.all(np.isfinite(np.asarray(got, np.float32)))
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2, rtol=0)
  np.testing.assert_array_equal(np.asarray(got, np.float32)[~np.asarray(valid)], 0.0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs on the GPU only")
def test_autoselected_layer_runs_the_cudnn_split_on_gpu():
  """No substitution: an autoselected bf16 head_dim-128 layer takes the cuDNN split path
  for its second chunk and equals the reference layer."""
  kw = dict(emb_dim=256, num_query_heads=4, num_kv_heads=2, head_dim=128, dtype=jnp.bfloat16)
  want_model = Attention(attention="dot_product", decode_attention="dot_product",
                         rngs=nnx.Rngs(0), **kw)
  got_model = Attention(attention="autoselected", decode_attention="dot_product",
                        rngs=nnx.Rngs(0), **kw)
  assert prefill_split.partial_kernel(got_model.settings) is partial.cudnn_partial_attention
  x = jax.random.normal(jax.random.key(1), (3, 10, 256), jnp.bfloat16)
  outs = []
  for model in (got_model, want_model):
    outs.append(serve(model, x))
  for a, b in zip(*outs):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               atol=3e-2, rtol=3e-2)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs on the GPU only")
def test_cudnn_check_first_made_inside_a_trace_still_passes():
  """A layer usually asks first while its step is being traced; the check must still run
  concretely (it once saw tracers there, failed and cached False for the process)."""
  partial.cudnn_partial_usable.cache_clear()
  seen = []

  def traced(x):
    seen.append(partial.cudnn_partial_usable())
    return x

  jax.jit(traced)(jnp.ones(2))
  assert seen == [True]
