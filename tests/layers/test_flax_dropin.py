"""meshattn.layers.MultiHeadAttention against Flax's own nnx.MultiHeadAttention (issue 19).

Both modules are built from the same nnx.Rngs seed (the parameters come out equal, which
is checked) and compared to float32 rounding: self, cross, separate k / v, Flax's masks,
extra batch dims, normalize_qk, GQA, decode token by token, and the nnx.state move. attnax's
extras are checked against the dot_product reference kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.layers import MultiHeadAttention
from meshattn.layers.kernels.api import KernelOptions
from meshattn.layers.kernels.train.dot_product import dot_product_attention
from meshattn.layers.masks import MaskSpec
from meshattn.layers.rope import RopeSpec, apply_rope

from helpers.meshes import mesh_of

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


# One compiled program per module and input shape: eager op-by-op dispatch would cost this
# file most of its time budget.
@nnx.jit(static_argnames=("decode", "is_causal", "sow_weights", "model_mode"))
def _run(module, *args, **kwargs):
  return module(*args, **kwargs)


def _pair(**kw):
  kw.setdefault("decode", False)
  flax_layer = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
  ours = MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
  pure_f, pure_o = nnx.to_pure_dict(nnx.state(flax_layer)), nnx.to_pure_dict(nnx.state(ours))
  assert jax.tree.structure(pure_f) == jax.tree.structure(pure_o)
  # Same seed, same parameters: the init order and initialisers are Flax's.
  jax.tree.map(_assert_same_bits, pure_f, pure_o)
  return flax_layer, ours


def _assert_same_bits(a, b):
  """Equal arrays, typed PRNG keys included (compared by their key data)."""
  bits = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  np.testing.assert_array_equal(bits(a), bits(b))


def _x(shape, seed):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


@pytest.mark.parametrize("kind", ["self", "cross", "separate_kv"])
def test_inputs_like_flax(kind):
  flax_layer, ours = _pair(num_heads=4, in_features=16, qkv_features=32, out_features=12,
                           in_kv_features=16 if kind == "self" else 10)
  q = _x((2, 5, 16), 1)
  args = {"self": (q,), "cross": (q, _x((2, 7, 10), 2)),
          "separate_kv": (q, _x((2, 7, 10), 2), _x((2, 7, 10), 3))}[kind]
  np.testing.assert_allclose(_run(ours, *args), _run(flax_layer, *args), **TOL)


def test_masks_and_extra_batch_dims():
  flax_layer, ours = _pair(num_heads=2, in_features=8, qkv_features=16, use_bias=False)
  x = _x((3, 2, 6, 8), 4)  # [batch1, batch2, T, D]
  causal = nnx.make_causal_mask(jnp.ones((3, 2, 6)))  # [3, 2, 1, 6, 6]
  # Padded queries and keys: a padded query sees no key, and gets Flax's average of all values.
  valid = jnp.arange(6)[None, None] < jnp.array([[2, 6], [4, 1], [6, 3]])[..., None]  # [3, 2, 6]
  padding = nnx.make_attention_mask(valid, valid)  # [3, 2, 1, 6, 6]
  both = nnx.combine_masks(padding, causal)
  np.testing.assert_allclose(_run(ours, x, mask=both), _run(flax_layer, x, mask=both), **TOL)
  np.testing.assert_allclose(_run(ours, x, mask=padding), _run(flax_layer, x, mask=padding), **TOL)
  np.testing.assert_allclose(_run(ours, x, is_causal=True), _run(flax_layer, x, is_causal=True),
                             **TOL)


def test_normalize_qk_and_gqa():
  flax_layer, ours = _pair(num_heads=4, num_kv_heads=2, in_features=12, qkv_features=16,
                           normalize_qk=True)
  assert {"query_ln", "key_ln"} <= set(nnx.to_pure_dict(nnx.state(ours)))
  # Non-trivial scales, moved from Flax's module into ours.
  flax_layer.query_ln.scale[...] = _x((4,), 5)
  flax_layer.key_ln.scale[...] = _x((4,), 6)
  nnx.update(ours, nnx.state(flax_layer))
  q, kv = _x((2, 5, 12), 7), _x((2, 3, 12), 8)
  np.testing.assert_allclose(_run(ours, q, kv), _run(flax_layer, q, kv), **TOL)


def test_state_round_trip():
  flax_layer, ours = _pair(num_heads=2, in_features=8, out_features=6)
  x = _x((2, 4, 8), 9)
  fresh = MultiHeadAttention(num_heads=2, in_features=8, out_features=6, decode=False,
                             rngs=nnx.Rngs(1))
  assert not np.allclose(_run(fresh, x), _run(flax_layer, x))
  nnx.update(fresh, nnx.state(flax_layer))  # Flax -> meshattn
  np.testing.assert_allclose(_run(fresh, x), _run(flax_layer, x), **TOL)
  other = nnx.MultiHeadAttention(num_heads=2, in_features=8, out_features=6, decode=False,
                                 rngs=nnx.Rngs(2))
  nnx.update(other, nnx.state(fresh))  # meshattn -> Flax
  np.testing.assert_allclose(_run(other, x), _run(flax_layer, x), **TOL)


def test_sow_weights_like_flax():
  flax_layer, ours = _pair(num_heads=2, in_features=8)
  x = _x((2, 4, 8), 10)
  valid = jnp.array([[True] * 4, [True, True, True, False]])  # [B, T]: one padded token
  mask = nnx.make_attention_mask(valid, valid)  # [B, 1, T, T]
  np.testing.assert_allclose(_run(ours, x, mask=mask, sow_weights=True),
                             _run(flax_layer, x, mask=mask, sow_weights=True), **TOL)
  w_f = nnx.state(flax_layer, nnx.Intermediate)["attention_weights"]
  w_o = nnx.state(ours, nnx.Intermediate)["attention_weights"]
  np.testing.assert_allclose(w_o[0], w_f[0], **TOL)


def test_decode_token_by_token():
  kw = dict(num_heads=4, in_features=8, qkv_features=16, num_kv_heads=2, normalize_qk=True,
            decode=True)
  flax_layer, ours = _pair(**kw)
  x = _x((2, 3, 5, 8), 11)  # [batch1, batch2, L, D]
  flax_layer.init_cache(x.shape)
  ours.init_cache(x.shape)
  cache_f = nnx.to_pure_dict(nnx.state(flax_layer, nnx.Cache))
  assert jax.tree.map(jnp.shape, cache_f) == jax.tree.map(
      jnp.shape, nnx.to_pure_dict(nnx.state(ours, nnx.Cache)))
  steps = []
  for t in range(x.shape[-2]):
    token = x[..., t:t + 1, :]  # [batch1, batch2, 1, D]
    y = _run(ours, token)
    np.testing.assert_allclose(y, _run(flax_layer, token), **TOL)
    steps.append(y)
  np.testing.assert_allclose(nnx.state(ours, nnx.Cache)["cached_key"][...],
                             nnx.state(flax_layer, nnx.Cache)["cached_key"][...], **TOL)
  assert int(ours.cache_index[...]) == x.shape[-2]
  # Token by token equals one causal pass over the whole sequence.
  causal = nnx.make_causal_mask(jnp.ones(x.shape[:-1]))
  whole = _run(ours, x, mask=causal, decode=False)
  np.testing.assert_allclose(jnp.concatenate(steps, -2), whole, **TOL)
  # The cache moves too: a Flax module continues from ours.
  ours.init_cache(x.shape)
  _run(ours, x[..., :1, :])
  flax_layer.init_cache(x.shape)
  nnx.update(flax_layer, nnx.state(ours))
  np.testing.assert_allclose(_run(flax_layer, x[..., 1:2, :]), steps[1], **TOL)


def test_sharded_like_flax():
  """With a mesh, the drop-in is meshattn's sharded layer: parameters placed by the logical
  rules, and the result still Flax's."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from meshattn.sharding import shard_module
  mesh = mesh_of(data=2, fsdp=2, tensor=2)
  kw = dict(num_heads=4, num_kv_heads=2, in_features=16, decode=False)
  flax_layer = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
  ours = MultiHeadAttention(**kw, mesh=mesh, rngs=nnx.Rngs(0))
  ours = shard_module(ours, mesh, ours.settings.logical_axis_rules)
  kernel = ours.query.kernel[...]  # [D, N, H]
  assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", "tensor", None)), 3)
  x = _x((4, 6, 16), 18)
  causal = nnx.make_causal_mask(jnp.ones((4, 6)))
  np.testing.assert_allclose(_run(ours, x, mask=causal), _run(flax_layer, x, mask=causal), **TOL)
  # Linen, with the mesh in its settings: Flax's variables in, Flax's result out.
  from flax import linen as nn
  from flax.core import FrozenDict
  from meshattn.layers import linen as mlinen
  flax_linen = nn.MultiHeadDotProductAttention(num_heads=4)
  variables = jax.jit(flax_linen.init)(jax.random.key(0), x)
  ours_linen = mlinen.MultiHeadDotProductAttention(num_heads=4, settings=FrozenDict(mesh=mesh))
  np.testing.assert_allclose(jax.jit(ours_linen.apply)(variables, x),
                             jax.jit(flax_linen.apply)(variables, x), **TOL)


def test_meshattn_modes_through_the_dropin():
  """The drop-in is meshattn's layer: a causal one prefills and decodes in meshattn's own
  KV cache (init_cache(batch_size, max_length)) and matches its whole-sequence pass."""
  from meshattn.layers import MaskSpec
  layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, in_features=16, use_rope=True,
                             mask=MaskSpec("global"), decode=False, rngs=nnx.Rngs(0))
  x = _x((2, 6, 16), 19)
  whole = _run(layer, x)
  layer.init_cache(2, 8)
  steps = [_run(layer, x[:, :4], model_mode="prefill")]
  steps += [_run(layer, x[:, t:t + 1], model_mode="autoregressive") for t in (4, 5)]
  np.testing.assert_allclose(jnp.concatenate(steps, 1), whole, **TOL)


def test_attnax_errors():
  base = dict(rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="divisible by 'num_heads'"):
    MultiHeadAttention(num_heads=3, in_features=8, **base)
  with pytest.raises(ValueError, match="num_kv_heads"):
    MultiHeadAttention(num_heads=4, in_features=8, num_kv_heads=3, **base)
  with pytest.raises(ValueError, match="num_kv_heads"):
    MultiHeadAttention(num_heads=4, in_features=8, num_kv_heads=8, **base)
  with pytest.raises(ValueError, match="even head_dim"):
    MultiHeadAttention(num_heads=2, in_features=6, use_rope=True, **base)
  with pytest.raises(ValueError, match="attention_fn and attention_type=LITE"):
    MultiHeadAttention(num_heads=2, in_features=8, attention_type="lite",
                       attention_fn=lambda *a, **k: a[0], **base)
  with pytest.raises(ValueError, match="`inputs_k` cannot be None"):
    MultiHeadAttention(num_heads=2, in_features=8, decode=False, **base)(
        _x((1, 2, 8), 0), None, _x((1, 2, 8), 1))


@jax.jit(static_argnames=("window", "rope_base"))
def _reference(p, x, *, window, rope_base):
  """Projections by hand (params p), RoPE, the dot_product kernel, output projection: the
  extras' meaning written without the layer."""
  proj = lambda name, h: jnp.einsum("btd,dnh->btn" + "h", h, p[name]["kernel"]) + p[name]["bias"]
  q, k, v = proj("query", x), proj("key", x), proj("value", x)  # [B, T, N|K, H]
  pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])  # [B, T]
  spec = RopeSpec(max_timescale=rope_base)
  q, k = apply_rope(q, pos, spec), apply_rope(k, pos, spec)
  options = KernelOptions(mask=MaskSpec("local_sliding", window=window), scale=q.shape[-1] ** -0.5)
  context, _ = dot_product_attention(q, k, v, options=options, q_positions=pos, kv_positions=pos)
  return jnp.einsum("btnh,nhd->btd", context, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("attention_type", ["standard", "memory_efficient"])
def test_attnax_extras_against_reference(attention_type):
  x = _x((2, 9, 16), 12)
  layer = MultiHeadAttention(num_heads=4, in_features=16, num_kv_heads=2, attention_window=3,
                             use_rope=True, rope_base=500.0, attention_type=attention_type,
                             attention_block_size=4, decode=False, rngs=nnx.Rngs(3))
  want = _reference(nnx.to_pure_dict(nnx.state(layer)), x, window=3, rope_base=500.0)
  np.testing.assert_allclose(_run(layer, x), want, **TOL)
  # Decoding token by token (RoPE at cache_index, the window over the cache) gives the same.
  layer.init_cache(x.shape)
  steps = [_run(layer, x[:, t:t + 1], decode=True) for t in range(x.shape[1])]
  np.testing.assert_allclose(jnp.concatenate(steps, 1), want, **TOL)
  # attention_block_size reaches the tiles of a kernel whose row takes any size (blockwise).
  fn, _ = layer._kernel_fn("train", frozenset({"gqa", "window"}), (9, 9))
  tiles = getattr(fn, "keywords", {})
  assert (tiles == {"block_q": 4, "block_kv": 4}) == (attention_type == "memory_efficient"), tiles


def test_score_mod_reaches_the_kernel():
  x = _x((1, 4, 8), 13)
  plain = MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0))
  zeroed = MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(0),
                              score_mod=lambda score, b, h, q, k: score * 0.0)
  # Scores all zero: every query averages the values uniformly.
  p = nnx.to_pure_dict(nnx.state(plain))
  v = jnp.einsum("btd,dnh->btnh", x, p["value"]["kernel"]) + p["value"]["bias"]
  mean_v = jnp.broadcast_to(v.mean(1, keepdims=True), v.shape)  # [B, T, N, H]
  want = jnp.einsum("btnh,nhd->btd", mean_v, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(_run(zeroed, x), want, **TOL)
  assert not np.allclose(_run(plain, x), want, **TOL)


def test_linen_trees_and_apply_with_flax_variables():
  from flax import linen as nn
  from meshattn.layers import linen as mlinen
  q, kv = _x((2, 5, 16), 14), _x((2, 7, 10), 15)
  kw = dict(num_heads=2, qkv_features=16, out_features=12, normalize_qk=True)
  flax_layer = nn.MultiHeadDotProductAttention(**kw)
  ours = mlinen.MultiHeadDotProductAttention(**kw)
  flax_vars = jax.jit(flax_layer.init)(jax.random.key(0), q, kv)
  ours_vars = jax.eval_shape(ours.init, jax.random.key(0), q, kv)  # the tree, not the values
  assert jax.tree.map(jnp.shape, ours_vars) == jax.tree.map(jnp.shape, flax_vars)
  flax_vars = jax.tree.map(lambda v: v + 0.1 * _x(v.shape, 16), flax_vars)  # LN scales too
  np.testing.assert_allclose(jax.jit(ours.apply)(flax_vars, q, kv),
                             jax.jit(flax_layer.apply)(flax_vars, q, kv), **TOL)


def test_linen_fields_are_flax_s_in_order():
  """Every field of flax.linen.MultiHeadDotProductAttention, in Flax's order (positional
  construction too); force_fp32_for_softmax gives Flax's bf16 result; the einsum modules
  Flax hands its own dot_product_attention are refused, named."""
  import dataclasses
  from flax import linen as nn
  from meshattn.layers import linen as mlinen
  names = lambda cls: [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
  assert names(mlinen.MultiHeadDotProductAttention) == names(nn.MultiHeadDotProductAttention) + ["settings"]
  x = _x((2, 5, 16), 18).astype(jnp.bfloat16)
  kw = dict(num_heads=2, dtype=jnp.bfloat16, force_fp32_for_softmax=True)
  flax_layer, ours = nn.MultiHeadDotProductAttention(**kw), mlinen.MultiHeadDotProductAttention(**kw)
  variables = jax.jit(flax_layer.init)(jax.random.key(0), x)
  np.testing.assert_allclose(np.asarray(jax.jit(ours.apply)(variables, x), np.float32),
                             np.asarray(jax.jit(flax_layer.apply)(variables, x), np.float32),
                             rtol=2e-2, atol=2e-2)
  for name in ("qk_attn_weights_einsum_cls", "attn_weights_value_einsum_cls"):
    with pytest.raises(NotImplementedError, match=name):
      mlinen.MultiHeadDotProductAttention(num_heads=2, **{name: nn.Einsum}).init(
          jax.random.key(0), x)


def test_linen_module_names_match_flax_linen():
  """`meshattn.layers.linen` offers flax.linen's names: MultiHeadAttention is Linen's
  MultiHeadDotProductAttention under its own class name (it was the NNX class, which wants
  in_features), so an auto-named submodule gets Flax's parameter path."""
  from flax import linen as nn
  from meshattn.layers import linen as mlinen
  assert issubclass(mlinen.MultiHeadAttention, mlinen.MultiHeadDotProductAttention)

  def parent(attention_cls):
    class Parent(nn.Module):
      @nn.compact
      def __call__(self, x):
        return attention_cls(num_heads=8, qkv_features=16)(x)
    return Parent()

  x = _x((2, 3, 16), 19)
  flax_layer, ours = parent(nn.MultiHeadAttention), parent(mlinen.MultiHeadAttention)
  variables = jax.jit(flax_layer.init)(jax.random.key(0), x)
  assert list(variables["params"]) == ["MultiHeadAttention_0"]
  np.testing.assert_allclose(jax.jit(ours.apply)(variables, x),
                             jax.jit(flax_layer.apply)(variables, x), **TOL)


def test_linen_self_attention_decode():
  from flax import linen as nn
  from meshattn.layers import linen as mlinen
  x = _x((2, 4, 8), 17)
  flax_layer, ours = nn.SelfAttention(num_heads=2, decode=True), mlinen.SelfAttention(
      num_heads=2, decode=True)
  flax_vars = jax.jit(flax_layer.init)(jax.random.key(0), x)
  ours_vars = jax.eval_shape(ours.init, jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours_vars) == jax.tree.map(jnp.shape, flax_vars)
  step = lambda layer: jax.jit(lambda v, t: layer.apply(v, t, mutable=["cache"]))
  step_f, step_o = step(flax_layer), step(ours)
  vars_f = vars_o = flax_vars
  for t in range(x.shape[1]):
    y_f, cache_f = step_f(vars_f, x[:, t:t + 1])
    y_o, cache_o = step_o(vars_o, x[:, t:t + 1])
    np.testing.assert_allclose(y_o, y_f, **TOL)
    vars_f, vars_o = {**vars_f, **cache_f}, {**vars_o, **cache_o}
  np.testing.assert_allclose(vars_o["cache"]["cached_value"], vars_f["cache"]["cached_value"],
                             **TOL)


_OUT_INITS = {"flax_defaults": {},
              "out_kernel_init": dict(out_kernel_init=nnx.initializers.normal(0.5)),
              "out_bias_init": dict(out_bias_init=nnx.initializers.normal(1.0)),
              "both_out_inits": dict(out_kernel_init=nnx.initializers.normal(0.5),
                                     out_bias_init=nnx.initializers.normal(1.0)),
              "bias_init": dict(bias_init=nnx.initializers.normal(1.0))}


@pytest.mark.parametrize("dropout_rate", [0.0, 0.1])
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("normalize_qk", [False, True])
@pytest.mark.parametrize("inits", sorted(_OUT_INITS))
def test_same_seed_same_state(inits, normalize_qk, use_bias, dropout_rate):
  """nnx.Rngs(seed) gives Flax's parameters and dropout stream, and leaves the caller's
  streams where Flax leaves them (so the next layer of a model draws Flax's keys too)."""
  kw = dict(num_heads=2, in_features=8, qkv_features=16, out_features=6, decode=False,
            normalize_qk=normalize_qk, use_bias=use_bias, dropout_rate=dropout_rate,
            **_OUT_INITS[inits])
  for rngs_f, rngs_o in ((nnx.Rngs(5), nnx.Rngs(5)),
                         (nnx.Rngs(params=5, dropout=6), nnx.Rngs(params=5, dropout=6))):
    state_f = nnx.to_pure_dict(nnx.state(nnx.MultiHeadAttention(**kw, rngs=rngs_f)))
    state_o = nnx.to_pure_dict(nnx.state(MultiHeadAttention(**kw, rngs=rngs_o)))
    assert jax.tree.structure(state_o) == jax.tree.structure(state_f)
    jax.tree.map(_assert_same_bits, state_o, state_f)
    _assert_same_bits(rngs_o.params(), rngs_f.params())
    _assert_same_bits(rngs_o.dropout(), rngs_f.dropout())



def test_view_flags_like_flax():
  """nnx.view takes Flax's set_view flags: deterministic switches dropout off and on as in
  Flax's module, decode switches Flax's decode path; a flag Flax refuses is refused."""
  flax_layer, ours = _pair(num_heads=2, in_features=8, dropout_rate=0.5)
  x = _x((2, 4, 8), 20)
  with pytest.raises(ValueError, match="No `deterministic` argument"):
    ours(x)  # like Flax: dropout on and no flag anywhere
  det_f, det_o = nnx.view(flax_layer, deterministic=True), nnx.view(ours, deterministic=True)
  assert det_o.deterministic and ours.deterministic is None  # a view, the layer unchanged
  np.testing.assert_allclose(det_o(x), det_f(x), **TOL)
  np.testing.assert_allclose(det_o(x), ours(x, deterministic=True), **TOL)
  drop_f, drop_o = nnx.view(flax_layer, deterministic=False), nnx.view(ours, deterministic=False)
  dropped = drop_o(x)
  assert not np.allclose(dropped, det_o(x), **TOL)
  np.testing.assert_allclose(dropped, drop_f(x), **TOL)  # the same seed, the same dropout keys
  # decode: the view's decode path reads Flax's cache (built by init_cache, as in Flax).
  flax_layer, ours = _pair(num_heads=2, in_features=8)
  view_f = nnx.view(flax_layer, decode=True, batch_size=2, max_length=4)
  view_o = nnx.view(ours, decode=True, batch_size=2, max_length=4)
  assert view_o.decode and not ours.decode and view_o.cached_key is None
  view_f.init_cache(x.shape)
  view_o.init_cache(x.shape)
  for t in range(x.shape[1]):
    np.testing.assert_allclose(view_o(x[:, t:t + 1]), view_f(x[:, t:t + 1]), **TOL)
  for bad in (dict(train=True), dict(deterministic=True, batch_sizes=2)):
    with pytest.raises(ValueError, match="Unused keys found in nnx.view"):
      nnx.view(flax_layer, **bad)
    with pytest.raises(ValueError, match="Unused keys found in nnx.view"):
      nnx.view(ours, **bad)


def test_float64_qk_norm_matches_flax_in_float64():
  """Norms run in float32 or wider: a float64 model's normalize_qk keeps float64 (it was
  computed in float32, ~1e-7 off Flax's float64 result)."""
  import subprocess, sys, textwrap  # x64 is process-wide: a child process keeps it there
  code = textwrap.dedent("""
      import jax; jax.config.update("jax_enable_x64", True)
      import jax.numpy as jnp, numpy as np
      from flax import nnx
      from meshattn.layers.flax_compat import MultiHeadAttention
      kw = dict(num_heads=4, in_features=16, qkv_features=8, normalize_qk=True, decode=False,
                dtype=jnp.float64, param_dtype=jnp.float64)
      theirs = nnx.MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
      ours = MultiHeadAttention(**kw, rngs=nnx.Rngs(0))
      nnx.update(ours, nnx.state(theirs, nnx.Param))
      x = jax.random.normal(jax.random.key(1), (2, 5, 16), jnp.float64)
      print(float(jnp.max(jnp.abs(ours(x) - theirs(x)))))
  """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       check=True)
  assert float(out.stdout.split()[-1]) < 1e-12, out.stdout + out.stderr
