"""The NNX drop-in against flax.nnx.MultiHeadAttention itself: a custom attention_fn is called
with Flax's keywords (module=, is_causal=; bias= only when the call has one) and its output used
as is; unbatched [T, D] inputs; nnx.view_info; attnax extras refuse bad values at construction."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.layers import MultiHeadAttention

D = 16


def _pair(**kw):
  """(flax's layer, meshattn's) from the same seed: the same parameters."""
  make = lambda cls: cls(num_heads=2, in_features=D, decode=False, rngs=nnx.Rngs(0), **kw)
  return make(nnx.MultiHeadAttention), make(MultiHeadAttention)


def _exact(query, key, value, mask=None, dropout_rng=None, dropout_rate=0.,
           broadcast_dropout=True, deterministic=False, dtype=None, precision=None, module=None,
           is_causal=False):
  """Takes exactly the keywords Flax's layer passes (no bias)."""
  return nnx.dot_product_attention(query, key, value, mask=mask, dropout_rng=dropout_rng,
                                   dropout_rate=dropout_rate, broadcast_dropout=broadcast_dropout,
                                   deterministic=deterministic, dtype=dtype, precision=precision,
                                   module=module, is_causal=is_causal)


def _close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("is_causal", [False, True])
def test_attention_fn_called_with_flax_keywords_and_sows(is_causal):
  x = jax.random.normal(jax.random.key(1), (2, 5, D))  # [B, T, D]
  flax_layer, ours = _pair(attention_fn=_exact)
  _close(ours(x, sow_weights=True, is_causal=is_causal),
         flax_layer(x, sow_weights=True, is_causal=is_causal))
  # module=self reached the function: nnx.dot_product_attention sowed the weights
  _close(ours.attention_weights.get_value()[0], flax_layer.attention_weights.get_value()[0])


def test_attention_fn_gets_flax_s_mask_argument():
  """No mask: the function is handed mask=None, as by Flax (a function may take a faster path
  then); a mask: the broadcast array Flax hands it."""
  seen = {}
  def recording(tag):
    def fn(q, k, v, mask=None, **kw):
      seen[tag] = mask
      return nnx.dot_product_attention(q, k, v, mask=mask, **kw)
    return fn
  x = jax.random.normal(jax.random.key(1), (2, 4, D))
  valid = jnp.array([[True, True, True, False], [True, True, False, False]])
  for mask in (None, nnx.make_attention_mask(valid, valid)):  # [2, 1, T, S]
    (flax_layer, _), (_, ours) = _pair(attention_fn=recording("flax")), _pair(
        attention_fn=recording("ours"))
    _close(ours(x, mask=mask), flax_layer(x, mask=mask))
    if mask is None:
      assert seen["ours"] is None and seen["flax"] is None
    else:
      np.testing.assert_array_equal(seen["ours"], jnp.broadcast_to(seen["flax"], (2, 1, 4, 4)))


def test_attention_fn_output_not_post_processed_for_padded_query():
  x = jax.random.normal(jax.random.key(1), (1, 4, D))
  valid = jnp.array([[True, True, True, False]])  # the padded query sees no key
  mask = nnx.make_attention_mask(valid, valid)  # [1, 1, T, S]
  fn = lambda q, k, v, **kw: nnx.dot_product_attention(q, k, v, **kw)
  flax_layer, ours = _pair(attention_fn=fn)
  _close(ours(x, mask=mask), flax_layer(x, mask=mask))


def test_attention_fn_without_bias_keyword_refuses_a_bias():
  x = jax.random.normal(jax.random.key(1), (1, 4, D))
  _, ours = _pair(attention_fn=_exact)
  with pytest.raises(ValueError, match="takes no `bias`"):
    ours(x, bias=jnp.zeros((1, 1, 4, 4)))


def test_unbatched_input_matches_flax():
  x = jax.random.normal(jax.random.key(1), (5, D))  # [T, D]
  mask = jnp.tril(jnp.ones((5, 5), bool))  # [T, S]
  flax_layer, ours = _pair()
  _close(ours(x, mask=mask, sow_weights=True), flax_layer(x, mask=mask, sow_weights=True))
  assert ours.attention_weights.get_value()[0].shape == (2, 5, 5)  # [N, T, S], as Flax's


def test_unbatched_decode_matches_flax():
  flax_layer, ours = _pair()
  for layer in (flax_layer, ours):
    layer.init_cache((4, D))  # [max_length, D]: no batch dims
  for t in range(3):
    x = jax.random.normal(jax.random.key(t), (1, D))  # [1, D]
    _close(ours(x, decode=True), flax_layer(x, decode=True))


def test_view_info_as_for_flax():
  flax_layer, ours = _pair()
  theirs, info = nnx.view_info(flax_layer).splitlines(), nnx.view_info(ours).splitlines()
  assert info[:5] == theirs[:5]  # the class, then deterministic and decode with Flax's words
  assert [l for l in info if not l.startswith("    ")] == [
      l for l in theirs if not l.startswith("    ")]  # the same flags, signatures and defaults


@pytest.mark.parametrize("kw, name", [
    (dict(use_rope=True, rope_base=0.0), "rope_base"),
    (dict(use_rope=True, rope_base=-5.0), "rope_base"),
    (dict(rope_base=float("nan")), "rope_base"),
    (dict(attention_type="flsh"), "attention_type"),
    (dict(attention_type="memory_efficient", attention_block_size=2.5), "attention_block_size"),
    (dict(attention_type="memory_efficient", attention_block_size=0), "attention_block_size"),
    (dict(attention_type="memory_efficient", attention_block_size="8"), "attention_block_size"),
    (dict(attention_type="linear", linear_attention_chunk_size=0), "linear_attention_chunk_size"),
    (dict(attention_type="linear", linear_attention_chunk_size=2.5),
     "linear_attention_chunk_size"),
    (dict(score_mod=3), "score_mod"),
    (dict(attention_window=2.5), "attention_window"),
    (dict(attention_window=True), "attention_window"),
    (dict(attention_window=0), "attention_window"),
])
def test_extras_refuse_bad_values_at_construction(kw, name):
  with pytest.raises(ValueError, match=name):
    MultiHeadAttention(num_heads=4, in_features=D, decode=False, rngs=nnx.Rngs(0), **kw)


def test_attention_type_error_lists_allowed():
  with pytest.raises(ValueError, match="memory_efficient"):
    MultiHeadAttention(num_heads=4, in_features=D, rngs=nnx.Rngs(0), attention_type="flsh")


def test_an_attention_fn_written_for_linen_keywords_runs():
  """Linen passes only the keywords a function takes: one without module / is_causal runs."""
  from meshattn.layers.flax_compat import MultiHeadAttention
  def linen_style(query, key, value, mask=None, dropout_rng=None, dropout_rate=0.0,
                  broadcast_dropout=True, deterministic=False, dtype=None, precision=None):
    return nnx.dot_product_attention(query, key, value, mask=mask, dtype=dtype,
                                     precision=precision)
  kw = dict(num_heads=2, in_features=8, decode=False)
  ours = MultiHeadAttention(**kw, attention_fn=linen_style, rngs=nnx.Rngs(0))
  theirs = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 8)), jnp.float32)  # [B, T, D]
  np.testing.assert_allclose(np.asarray(ours(x)), np.asarray(theirs(x)), rtol=1e-5, atol=1e-6)
