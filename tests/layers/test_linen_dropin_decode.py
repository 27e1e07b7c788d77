"""The Linen drop-in's decode and dropout against flax.linen's own classes.

Decode continues whatever cache kind the layer stores (Flax's K/V, or a linear layer's
state); an immutable `cache` collection raises Flax's errors instead of dropping the
update; a dropout key gives Flax's mask, by `rngs={"dropout": key}` or `dropout_rng=key`.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.core import FrozenDict

from meshattn.layers import linen as ml

TOL = dict(rtol=1e-5, atol=1e-5)
X = jax.random.normal(jax.random.key(1), (2, 4, 16))  # [B, T, D]


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _decode(module, variables, x):
  """One token per apply, the cache carried as a Linen loop carries it: [B, T, D_out]."""
  params, cache, ys = variables["params"], variables["cache"], []
  for t in range(x.shape[-2]):
    y, upd = module.apply({"params": params, "cache": cache}, x[:, t:t + 1], mutable=["cache"])
    cache = upd["cache"]
    ys.append(y)
  return jnp.concatenate(ys, axis=-2)


def test_kv_decode_equals_flax():
  ours = ml.MultiHeadDotProductAttention(num_heads=4, decode=True)
  flaxs = nn.MultiHeadDotProductAttention(num_heads=4, decode=True)
  v = flaxs.init(jax.random.key(0), X)
  np.testing.assert_allclose(_decode(ours, v, X), _decode(flaxs, v, X), **TOL)


@pytest.mark.parametrize("attention_type", ["linear", "lite"])
def test_extra_decode_equals_causal_pass(attention_type):
  # Every step must see the tokens before it: the whole causal pass, row for row.
  settings = FrozenDict(attention_type=attention_type)
  dec = ml.MultiHeadDotProductAttention(num_heads=4, decode=True, settings=settings)
  full = ml.MultiHeadDotProductAttention(num_heads=4, settings=settings)
  v = dec.init(jax.random.key(0), X)
  mask = None if attention_type == "linear" else nn.make_causal_mask(X[..., 0])  # linear: causal
  ref = full.apply({"params": v["params"]}, X, mask=mask)  # [B, T, D]
  np.testing.assert_allclose(_decode(dec, v, X), ref, **TOL)


@pytest.mark.parametrize("settings", [FrozenDict(), FrozenDict(attention_type="linear")])
def test_immutable_cache_raises_as_flax(settings):
  flaxs = nn.MultiHeadDotProductAttention(num_heads=2, decode=True)
  ours = ml.MultiHeadDotProductAttention(num_heads=2, decode=True, settings=settings)
  v = ours.init(jax.random.key(0), X)  # init makes the cache, as Flax's init does
  vf = flaxs.init(jax.random.key(0), X)
  with pytest.raises(flax.errors.ModifyScopeVariableError):
    flaxs.apply(vf, X[:, :1])
  with pytest.raises(flax.errors.ModifyScopeVariableError, match='collection "cache"'):
    ours.apply(v, X[:, :1])
  with pytest.raises(flax.errors.ScopeCollectionNotFound):
    flaxs.apply({"params": vf["params"]}, X)
  with pytest.raises(flax.errors.ScopeCollectionNotFound, match='collection "cache"'):
    ours.apply({"params": v["params"]}, X)
  # mutable, no cache yet: the call makes it (Flax's first call)
  _, upd = ours.apply({"params": v["params"]}, X, mutable=["cache"])
  assert upd["cache"]


@pytest.mark.parametrize("cls", ["MultiHeadDotProductAttention", "SelfAttention"])
def test_dropout_key_gives_flax_mask(cls):
  flaxs = getattr(nn, cls)(num_heads=2, dropout_rate=0.3)
  ours = getattr(ml, cls)(num_heads=2, dropout_rate=0.3)
  v = flaxs.init(jax.random.key(0), X, deterministic=True)
  key = jax.random.key(3)
  want = flaxs.apply(v, X, deterministic=False, rngs={"dropout": key})
  np.testing.assert_allclose(ours.apply(v, X, deterministic=False, rngs={"dropout": key}),
                             want, **TOL)
  np.testing.assert_allclose(ours.apply(v, X, deterministic=False, dropout_rng=key),
                             flaxs.apply(v, X, deterministic=False, dropout_rng=key), **TOL)


def test_wrong_shaped_params_raise_as_flax():
  """A parameter of another shape (a checkpoint of another config) raises Flax's
  ScopeParamShapeError naming it, nested scopes included, before the layer runs."""
  class Outer(nn.Module):
    cls: type

    @nn.compact
    def __call__(self, x):
      return self.cls(num_heads=2, qkv_features=8, name="attn")(x)

  for cls in (nn.MultiHeadDotProductAttention, ml.MultiHeadDotProductAttention):
    model = Outer(cls)
    v = model.init(jax.random.key(0), X)
    bad = jax.tree.map(lambda a: a, v)
    bad = flax.core.unfreeze(bad)
    bad["params"]["attn"]["value"]["kernel"] = jnp.zeros((16, 2, 2))
    with pytest.raises(flax.errors.ScopeParamShapeError,
                       match=r'"kernel" in "/attn/value".*\(16, 2, 4\).*\(16, 2, 2\)'):
      model.apply(bad, X)


@pytest.mark.parametrize("force", [True, False])
def test_custom_attention_fn_gets_force_fp32_for_softmax_as_from_flax(force):
  """Linen's layer passes force_fp32_for_softmax to an attention_fn that takes it."""
  def make_fn(seen):
    def fn(q, k, v, mask=None, force_fp32_for_softmax=None, **kw):
      seen.append(force_fp32_for_softmax)
      return nn.dot_product_attention(q, k, v, mask=mask)
    return fn

  got = {}
  for cls in (nn.MultiHeadDotProductAttention, ml.MultiHeadDotProductAttention):
    seen = got.setdefault(cls.__module__, [])
    m = cls(num_heads=2, attention_fn=make_fn(seen), force_fp32_for_softmax=force)
    m.apply(m.init(jax.random.key(0), X), X)
  assert got["meshattn.layers.linen"] == got["flax.linen.attention"] and got["flax.linen.attention"]
  assert set(got["meshattn.layers.linen"]) == {force}
