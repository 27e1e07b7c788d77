"""A rejected prefill / decode step raises in the caller, leaves the cache as it was
and leaves the process usable: eagerly, under jit, on an 8-device mesh
(issue 14, part 1). Under a multi-device mesh nothing may raise inside the
computation (the process would abort in a collective), so these tests also
prove the process survives: each one makes a good call after the bad one."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.configs import load_config
from meshattn.kvcache.step_checks import StepRejected
from meshattn.layers import Attention
from meshattn.layers.serving import jit_step, raise_if_rejected
from meshattn.sharding import create_mesh, shard_module


def snapshot(cache):
  """Every cache array but the rejection bits (which record the last step)."""
  state = nnx.state(cache)
  return [np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(state)
          if "rejected" not in jax.tree_util.keystr(path)]


def assert_unchanged(before, cache):
  after = snapshot(cache)
  assert len(before) == len(after)
  for a, b in zip(before, after):
    np.testing.assert_array_equal(a, b)


@jit_step(static_argnames="mode")
def step(model, x, mode, slots=None):
  return model(x, model_mode=mode, slots=slots)


@nnx.jit(static_argnames="mode")
def plain_step(model, x, mode, slots=None):
  return model(x, model_mode=mode, slots=slots)


def tiny_on_mesh(*overrides):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  cfg = load_config("tiny", "ici_data_parallelism=2", "ici_tensor_parallelism=2",
                    "ici_fsdp_parallelism=2", *overrides)
  mesh = create_mesh(cfg)
  model = Attention(cfg, mesh=mesh, rngs=nnx.Rngs(0))
  shard_module(model, mesh, model.settings.logical_axis_rules)
  return model


@pytest.fixture(scope="module")
def full_cache_model():
  """The issue's reproduction: tiny on 8 devices, 8 slots of 4 tokens, all filled."""
  model = tiny_on_mesh()
  model.init_cache(8, 4)
  x = jax.random.normal(jax.random.key(0), (8, 4, 64))
  step(model, x, "prefill")
  return model


@pytest.mark.parametrize("decode", ["dot_product", "ragged"])
def test_overflow_under_jit_on_a_mesh_raises_and_changes_nothing(full_cache_model, decode):
  model = full_cache_model
  model.settings = dataclasses.replace(model.settings, decode_attention=decode)
  before = snapshot(model.cache)
  token = jnp.ones((8, 1, 64))
  with pytest.raises(StepRejected, match="max_length=4"):
    step(model, token, "autoregressive")
  assert_unchanged(before, model.cache)
  # The process is usable: free a slot and decode only it.
  with pytest.raises(StepRejected, match=r"slot index out of range.*\[0, 8\)"):
    step(model, token[:1], "autoregressive", jnp.array([9]))
  assert_unchanged(before, model.cache)


def test_plain_nnx_jit_on_a_mesh_rejects_without_aborting(full_cache_model):
  """Outside jit_step the step still writes nothing and records why; the host reads it."""
  model = full_cache_model
  before = snapshot(model.cache)
  out = plain_step(model, jnp.ones((8, 1, 64)), "autoregressive")
  np.testing.assert_array_equal(np.asarray(out), 0.0)  # no row sees anything of a refused step
  assert_unchanged(before, model.cache)
  with pytest.raises(StepRejected, match="max_length=4"):
    raise_if_rejected(model)
  np.testing.assert_array_equal(np.asarray(model.cache.lengths[...]), 4)


def test_a_good_step_after_a_rejected_one():
  model = tiny_on_mesh()
  cache = model.init_cache(4, 8)
  x = jax.random.normal(jax.random.key(1), (4, 3, 64))
  step(model, x, "prefill")
  with pytest.raises(StepRejected, match="at most once"):
    step(model, x[:2], "prefill", jnp.array([1, 1]))
  y = step(model, x[:, :1], "autoregressive")
  assert y.shape == (4, 1, 64) and np.all(np.isfinite(np.asarray(y)))
  np.testing.assert_array_equal(np.asarray(cache.lengths[...]), 4)
  raise_if_rejected(model)  # the last step was served: nothing to raise


def test_paged_step_without_reserved_pages_raises_on_a_mesh():
  model = tiny_on_mesh("paged_kv_cache=true", "num_pages=8", "tokens_per_page=4",
                       "decode_attention=paged")
  cache = model.init_cache(2, 8)
  x = jax.random.normal(jax.random.key(2), (2, 4, 64))
  before = snapshot(cache)
  with pytest.raises(StepRejected, match="not reserved"):
    step(model, x, "prefill")
  assert_unchanged(before, cache)
  cache.reserve_for_step(jnp.arange(2), 4)
  step(model, x, "prefill")
  before = snapshot(cache)
  with pytest.raises(StepRejected, match="not reserved"):  # token 5 needs a second page
    step(model, x[:, :1], "autoregressive")
  assert_unchanged(before, cache)
  cache.reserve_for_step(jnp.arange(2), 1)
  step(model, x[:, :1], "autoregressive")
  np.testing.assert_array_equal(np.asarray(cache.lengths[...]), 5)


def test_eager_rejection_names_the_slots():
  model = Attention(load_config("tiny"), rngs=nnx.Rngs(0))
  cache = model.init_cache(2, 4)
  before = snapshot(cache)
  with pytest.raises(StepRejected, match=r"max_length=4.*\(slots \[0, 1\]\)"):
    model(jnp.ones((2, 5, 64)), model_mode="prefill")
  assert_unchanged(before, cache)


def test_single_device_plain_jit_still_raises():
  """One CPU device has no collective to leave waiting: a plain nnx.jit step raises (callback).
  On an accelerator the rejection is recorded instead (the callback's failure would arrive
  asynchronously and poison the outputs): the host raises it."""
  model = Attention(load_config("tiny"), rngs=nnx.Rngs(0))
  cache = model.init_cache(2, 2)
  step_fn = plain_step
  step_fn(model, jnp.ones((2, 2, 64)), "prefill")
  before = snapshot(cache)
  with pytest.raises(Exception, match="max_length=2"):
    step_fn(model, jnp.ones((2, 1, 64)), "autoregressive")
    raise_if_rejected(model)  # reached only where no callback raised (not the CPU)
  assert_unchanged(before, cache)


@jit_step
def segmented_prefill(model, x, seg):
  return model(x, decoder_segment_ids=seg, model_mode="prefill")


@pytest.mark.parametrize("where", ["eager", "jit", "mesh"])
def test_a_row_packing_two_sequences_is_rejected(where):
  """Prefill continues one cache slot per row: a second nonzero id in a row (a packed row, as
  train mode takes) would attend to the first sequence, so the step is rejected, whatever id
  labels the row's one sequence."""
  if where == "mesh":
    model = tiny_on_mesh()
  else:
    model = Attention(load_config("tiny"), rngs=nnx.Rngs(0))
  model.init_cache(8, 8)
  x = jax.random.normal(jax.random.key(0), (8, 4, 64))
  run = (lambda m, x, seg: m(x, decoder_segment_ids=seg, model_mode="prefill")) if where == "eager" \
      else segmented_prefill
  before = snapshot(model.cache)
  packed = jnp.array([[1, 1, 2, 2]] + [[1, 1, 1, 0]] * 7, jnp.int32)
  with pytest.raises(StepRejected, match="one sequence per row"):
    run(model, x, packed)
  assert_unchanged(before, model.cache)
  one_each = jnp.array([[3, 3, 3, 3], [7, 7, 0, 0]] + [[1, 1, 1, 0]] * 6, jnp.int32)
  run(model, x, one_each)  # any nonzero id labels a row's one sequence
  np.testing.assert_array_equal(model.cache.lengths[...], [4, 2] + [3] * 6)
