"""The layer's public surface: config constructor, parameter names and shapes,
presets, Flax parity (MultiHeadAttention, attention_fn, mask helpers), dropout,
sowing, named checkpoints, the Linen bridge, and errors."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from meshattn.configs import list_presets, load_config
from meshattn.configs import loader as config_loader
from meshattn.layers import (KNOWN_KERNELS, Attention, MaskSpec, RopeSpec, attention_as_linen,
                             combine_masks, make_attention_mask, make_causal_mask)
from meshattn.sharding import create_mesh


def param_shapes(model):
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(map(str, path)): tuple(v.shape) for path, v in flat}


def randomize(model, seed=0):
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [0.3 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(treedef, new))
  return model


def test_param_names_and_shapes_from_config():
  cfg = load_config("tiny", "use_bias=true", "use_qk_norm=true", "attention_sink=true")
  model = Attention(cfg, rngs=nnx.Rngs(0))
  d, n, k, h = cfg.emb_dim, cfg.num_query_heads, cfg.num_kv_heads, cfg.head_dim
  assert param_shapes(model) == {
      "query.kernel": (d, n, h), "query.bias": (n, h),
      "key.kernel": (d, k, h), "key.bias": (k, h),
      "value.kernel": (d, k, h), "value.bias": (k, h),
      "out.kernel": (n, h, d), "out.bias": (d,),
      "query_norm.scale": (h,), "key_norm.scale": (h,), "sinks": (n,)}


def test_fused_and_shared_projection_params():
  cfg = load_config("tiny")
  fused = param_shapes(Attention(cfg, rngs=nnx.Rngs(0), fused_qkv=True))
  g = cfg.num_query_heads // cfg.num_kv_heads
  assert fused == {"qkv_proj.kernel": (cfg.emb_dim, cfg.num_kv_heads, g + 2, cfg.head_dim),
                   "out.kernel": (cfg.num_query_heads, cfg.head_dim, cfg.emb_dim)}
  shared = param_shapes(Attention(cfg, rngs=nnx.Rngs(0), share_kv_projections=True))
  assert set(shared) == {"query.kernel", "key.kernel", "out.kernel"}


@pytest.mark.parametrize("preset", list_presets())
def test_every_preset_builds_under_eval_shape(preset):
  cfg = load_config(preset)
  mesh = create_mesh(cfg)
  model = nnx.eval_shape(lambda: Attention(cfg, mesh=mesh, rngs=nnx.Rngs(0)))
  shapes = param_shapes(model)
  assert shapes["out.kernel"] == (cfg.num_query_heads, cfg.head_dim, cfg.emb_dim)
  x = jax.ShapeDtypeStruct((1, 16, cfg.emb_dim), jnp.float32)
  out = jax.eval_shape(lambda m, x: m(x, model_mode="train"), model, x)
  assert out.shape == (1, 16, cfg.emb_dim)


def test_layer_pattern_selects_attention_type():
  cfg = load_config("gemma2-9b")
  assert Attention(cfg, rngs=nnx.Rngs(0), layer_idx=0, emb_dim=32, num_query_heads=2,
                   num_kv_heads=1, head_dim=16).settings.mask == MaskSpec("local_sliding", window=4096)
  assert Attention(cfg, rngs=nnx.Rngs(0), layer_idx=1, emb_dim=32, num_query_heads=2,
                   num_kv_heads=1, head_dim=16).settings.mask == MaskSpec("global")


def test_kernel_names_agree_with_config_loader():
  from meshattn.layers.kernels import registry
  assert set(KNOWN_KERNELS) == set(config_loader.KNOWN_KERNELS) == set(registry.TRAIN_KERNELS)
  assert set(config_loader.DECODE_KERNELS) == set(registry.DECODE_KERNELS)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(attention="splashy"), "attention"),
    (dict(fused_qkv=True, share_kv_projections=True), "fused_qkv"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(attn_logits_soft_cap=-1.0), "attn_logits_soft_cap"),
])
def test_bad_settings_raise_naming_the_key(kwargs, match):
  base = dict(emb_dim=32, num_query_heads=4, num_kv_heads=2, head_dim=8)
  with pytest.raises(ValueError, match=match):
    Attention(rngs=nnx.Rngs(0), **{**base, **kwargs})


def test_unknown_keyword_and_bad_mode():
  with pytest.raises(TypeError, match="num_heads"):
    Attention(rngs=nnx.Rngs(0), emb_dim=32, num_heads=4)
  model = Attention(rngs=nnx.Rngs(0), emb_dim=32, num_query_heads=4)
  with pytest.raises(ValueError, match="model_mode"):
    model(jnp.ones((1, 4, 32)), model_mode="decode")
  with pytest.raises(ValueError, match="MaskSpec|sliding_window_size"):
    MaskSpec("local_sliding")


@pytest.mark.parametrize("kind, size", [("local_sliding", 2.5), ("local_sliding", 3.0),
                                         ("local_sliding", True), ("chunk", 4.0),
                                         ("chunk", 0), ("local_sliding", -1)])
def test_mask_spec_refuses_a_size_that_is_not_a_positive_integer(kind, size):
  """The config's rule (sliding_window_size / chunk_attn_window_size: int > 0) holds for the
  keyword path too: a float window of 2.5 saw 3 keys and broke the cache built from it."""
  key = "window" if kind == "local_sliding" else "chunk"
  with pytest.raises(ValueError, match=rf"{key} \(\w+\) must be"):
    MaskSpec(kind, **{key: size})


def test_mask_spec_keeps_only_the_size_its_kind_uses():
  """Readers test spec.window / spec.chunk / spec.is_causal, never the kind's name: a size
  given to a kind that does not use it is dropped, so equal patterns give equal specs."""
  assert MaskSpec("global", window=5, chunk=8) == MaskSpec("global")
  assert MaskSpec("chunk", window=5, chunk=8) == MaskSpec("chunk", chunk=8)
  spec = MaskSpec("local_sliding", window=5, chunk=8)
  assert (spec.window, spec.chunk, spec.is_causal, spec.plain_causal) == (5, None, True, False)
  assert MaskSpec("global").plain_causal and not MaskSpec("full").is_causal
  assert not MaskSpec("full").plain_causal


def test_matches_flax_multi_head_attention():
  """Full (bidirectional) attention without RoPE is Flax's MultiHeadAttention."""
  d, n, h = 32, 4, 8
  ours = randomize(Attention(rngs=nnx.Rngs(0), emb_dim=d, num_query_heads=n, head_dim=h,
                             use_bias=True, mask=MaskSpec("full"), rope=RopeSpec("none")))
  theirs = nnx.MultiHeadAttention(num_heads=n, in_features=d, qkv_features=n * h, decode=False,
                                  rngs=nnx.Rngs(1))
  for name in ("query", "key", "value", "out"):
    for p in ("kernel", "bias"):
      getattr(getattr(theirs, name), p)[...] = getattr(getattr(ours, name), p)[...]
  x = jax.random.normal(jax.random.key(3), (2, 6, d))
  pad = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  mask = make_attention_mask(pad, pad)  # [B, 1, T, T]
  want = theirs(x, mask=mask, deterministic=True)
  got = ours(x, mask=mask)
  valid = pad.astype(bool)
  np.testing.assert_allclose(got[valid], want[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_flax_attention_fn_matches_builtin(kv_heads):
  kw = dict(emb_dim=32, num_query_heads=4, num_kv_heads=kv_heads, head_dim=8,
            mask=MaskSpec("local_sliding", window=3), query_pre_attn_scalar=12.0)
  builtin = randomize(Attention(rngs=nnx.Rngs(0), **kw))
  custom = Attention(rngs=nnx.Rngs(0), attention_fn=nnx.dot_product_attention, **kw)
  nnx.update(custom, nnx.state(builtin, nnx.Param))
  x = jax.random.normal(jax.random.key(1), (2, 8, 32))
  seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]] * 2)
  np.testing.assert_allclose(custom(x, decoder_segment_ids=seg), builtin(x, decoder_segment_ids=seg),
                             rtol=1e-5, atol=1e-5)


def test_attention_fn_refuses_soft_cap_and_sinks():
  for kw in (dict(attn_logits_soft_cap=5.0), dict(attention_sink=True)):
    model = Attention(rngs=nnx.Rngs(0), emb_dim=16, num_query_heads=2,
                      attention_fn=nnx.dot_product_attention, **kw)
    with pytest.raises(ValueError, match="attn_logits_soft_cap|attention_sink"):
      model(jnp.ones((1, 4, 16)))


def test_mask_helpers_match_flax():
  x = jnp.array([[1, 1, 0], [1, 0, 0]])
  np.testing.assert_array_equal(make_causal_mask(x), nn.make_causal_mask(x))
  np.testing.assert_array_equal(make_attention_mask(x, x), nn.make_attention_mask(x, x))
  a, b = make_causal_mask(x), make_attention_mask(x, x)
  np.testing.assert_array_equal(combine_masks(a, None, b), nn.combine_masks(a, None, b))
  assert combine_masks(None, None) is None


def test_sow_attention_weights():
  model = Attention(rngs=nnx.Rngs(0), emb_dim=16, num_query_heads=4, num_kv_heads=2)
  x = jax.random.normal(jax.random.key(0), (3, 2, 5, 16))  # extra leading batch dim
  _, captured = nnx.capture(model, nnx.Intermediate)(x, sow_weights=True)
  weights = jax.tree.leaves(captured["attention_weights"])[0]  # [3, 2, N, T, S]
  assert weights.shape == (3, 2, 4, 5, 5)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  assert float(jnp.triu(weights, 1).max()) == 0.0  # causal


def test_dropout():
  kw = dict(emb_dim=16, num_query_heads=2, dropout_rate=0.5, rngs=nnx.Rngs(params=0, dropout=1))
  model = Attention(**kw)
  x = jnp.broadcast_to(jax.random.normal(jax.random.key(0), (1, 6, 16)), (2, 6, 16))
  no_drop = Attention(**{**kw, "dropout_rate": 0.0})
  nnx.update(no_drop, nnx.state(model, nnx.Param))
  np.testing.assert_allclose(model(x, deterministic=True), no_drop(x), rtol=1e-6)
  a, b = model(x, deterministic=False), model(x, deterministic=False)
  assert not np.allclose(a, b)  # the stream advances
  np.testing.assert_allclose(a[0], a[1], rtol=1e-6)  # broadcast_dropout: one mask for the batch
  per_example = Attention(**{**kw, "broadcast_dropout": False})
  c = per_example(x, deterministic=False)
  assert not np.allclose(c[0], c[1])
  # rngs passed at call time take precedence and are reproducible.
  np.testing.assert_allclose(model(x, deterministic=False, rngs=nnx.Rngs(dropout=5)),
                             model(x, deterministic=False, rngs=nnx.Rngs(dropout=5)))


def test_named_checkpoints_present():
  model = Attention(rngs=nnx.Rngs(0), emb_dim=16, num_query_heads=2)
  graph, state = nnx.split(model)
  jaxpr = str(jax.make_jaxpr(lambda s, x: nnx.merge(graph, s)(x))(state, jnp.ones((1, 4, 16))))
  for name in ("query_proj", "key_proj", "value_proj", "context", "out_proj"):
    assert f"name={name}" in jaxpr, name


def test_cross_attention_shapes_and_kv_features():
  model = Attention(rngs=nnx.Rngs(0), emb_dim=16, kv_emb_dim=12, num_query_heads=2,
                    out_features=10, mask=MaskSpec("full"))
  out = model(jnp.ones((2, 3, 16)), jnp.ones((2, 7, 12)))
  assert out.shape == (2, 3, 10)


def test_linen_bridge_matches_nnx():
  cfg = load_config("tiny")
  x = jax.random.normal(jax.random.key(0), (2, 8, cfg.emb_dim))

  class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
      return attention_as_linen(cfg, name="attn")(x, x, model_mode="train")

  variables = Model().init(jax.random.key(0), x)
  out = Model().apply(variables, x)
  params = nn.unbox(variables)["params"]["attn"]
  nnx_model = Attention(cfg, rngs=nnx.Rngs(1))
  for name in ("query", "key", "value", "out"):
    getattr(nnx_model, name).kernel[...] = params[name]["kernel"]
  np.testing.assert_allclose(out, nnx_model(x), rtol=1e-6, atol=1e-6)
  assert flax.__version__  # the bridge is Flax's own nnx.bridge


def test_qk_norm_and_temperature_settings_errors():
  from flax import nnx

  from meshattn.layers import Attention, RopeSpec

  base = dict(emb_dim=32, num_query_heads=4, head_dim=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"qk_norm_type='rmsnorm': allowed \['rms', 'l2', 'layernorm'\]"):
    Attention(use_qk_norm=True, qk_norm_type="rmsnorm", **base)
  with pytest.raises(ValueError, match="temperature_tuning scales the queries of layers without "
                                       "RoPE .* rope_type='default'"):
    Attention(temperature_tuning=True, **base)
  with pytest.raises(ValueError, match="temperature_tuning_floor_scale=0.0: must be > 0"):
    Attention(temperature_tuning=True, temperature_tuning_floor_scale=0.0,
              rope=RopeSpec("none"), **base)
  # The L2 norm has no parameters; layernorm has a scale and no bias.
  l2 = Attention(use_qk_norm=True, qk_norm_type="l2", **base)
  ln = Attention(use_qk_norm=True, qk_norm_type="layernorm", **base)
  keys = lambda m: sorted(".".join(map(str, k)) for k, _ in nnx.state(m, nnx.Param).flat_state())
  assert keys(l2) == ["key.kernel", "out.kernel", "query.kernel", "value.kernel"]
  assert "query_norm.scale" in keys(ln) and not any("norm.bias" in k for k in keys(ln))
