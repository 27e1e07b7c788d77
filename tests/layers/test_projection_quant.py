"""Projection matmuls: the Flax-style qkv_dot_general / out_dot_general hooks and
quantization="int8" (AQT int8 x int8 forward, layers/quantization.py).

int8 is checked against a float64 NumPy emulation of its numerics
(`int8_dense_np`: symmetric, absolute maximum over the contracted axes, 127.5
steps, round to nearest): the layer must be far closer to that emulation
than to the unquantized float64 layer, so a layer that silently skipped the
quantization (or quantized along the wrong axes) fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.layer_params import randomize, ref_settings
from helpers.meshes import mesh_of
from helpers.numpy_reference import attention_layer_np, int8_dense_np, int8_operands_np
from meshattn.configs import ConfigError, load_config, validation
from meshattn.layers import Attention, MaskSpec
from meshattn.layers.projections import QK_NORM_TYPES, DenseGeneral
from meshattn.layers.quantization import QUANTIZATION_MODES, projection_dot_general

B, T, D = 2, 8, 32


def _x(seed=1, shape=(B, T, D)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _rel(got, want):
  return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def test_config_modes_match_the_layer():
  assert validation.QUANTIZATION_MODES == QUANTIZATION_MODES
  assert validation.QK_NORM_TYPES == QK_NORM_TYPES


def test_dense_int8_matches_numpy_emulation():
  """A [16] -> [4, 3] projection: the int8 result is the emulation's (float32 rounding of the
  scales only), and 1e-3 or more away from the float product."""
  layer = DenseGeneral((16,), (4, 3), kernel_axes=("embed", "q_heads", "kv_head_dim"),
                       rngs=nnx.Rngs(0), dot_general=projection_dot_general("int8"))
  x = _x(shape=(2, 5, 16))
  kernel = np.asarray(layer.kernel[...], np.float64)
  want = int8_dense_np(x, kernel, 1)  # [2, 5, 4, 3]
  got = layer(jnp.asarray(x))
  assert _rel(got, want) < 1e-5
  assert _rel(got, np.tensordot(np.asarray(x, np.float64), kernel, axes=1)) > 1e-3


CASES = {
    "mha": dict(num_kv_heads=4),
    "gqa_qk_norm_bias": dict(num_kv_heads=2, use_qk_norm=True, use_bias=True),
    "mqa_window": dict(num_kv_heads=1, mask=MaskSpec("local_sliding", window=3)),
    "fused_qkv": dict(num_kv_heads=2, fused_qkv=True),
    "shared_kv": dict(num_kv_heads=2, share_kv_projections=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_int8_layer_matches_numpy(case):
  """The whole layer with quantization="int8" against the float64 reference whose four
  projections run the int8 emulation; the unquantized reference is 10x further away."""
  kw = dict(emb_dim=D, num_query_heads=4, head_dim=8, **CASES[case])
  model = Attention(rngs=nnx.Rngs(0), quantization="int8", **kw)
  params = randomize(model, 7)
  x = _x()
  got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x))
  pos = np.broadcast_to(np.arange(T), (B, T))
  settings = dict(ref_settings(kw), q_positions=pos)
  want, _ = attention_layer_np(params, x, dense=int8_dense_np, **settings)
  plain, _ = attention_layer_np(params, x, **settings)
  err = _rel(got, want)
  assert err < 1e-4, err
  assert _rel(got, plain) > 10 * max(err, 1e-5)


class _Spy:
  """jax.lax.dot_general that counts its calls (traced once under jit)."""

  def __init__(self):
    self.calls = 0

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    self.calls += 1
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


@pytest.mark.parametrize("projections, kw", [(3, {}), (1, dict(fused_qkv=True)),
                                             (2, dict(share_kv_projections=True))],
                         ids=["separate", "fused", "shared_kv"])
def test_dot_general_hooks(projections, kw):
  """qkv_dot_general runs every q/k/v projection and out_dot_general the output one; a hook
  that computes the same product leaves the layer's output unchanged."""
  qkv, out = _Spy(), _Spy()
  common = dict(emb_dim=D, num_query_heads=4, num_kv_heads=2, head_dim=8, **kw)
  hooked = Attention(rngs=nnx.Rngs(0), qkv_dot_general=qkv, out_dot_general=out, **common)
  plain = Attention(rngs=nnx.Rngs(0), **common)
  x = jnp.asarray(_x())
  np.testing.assert_array_equal(hooked(x), plain(x))
  assert (qkv.calls, out.calls) == (projections, 1)


def test_out_hook_result_is_used():
  zero = lambda lhs, rhs, dims, precision=None, preferred_element_type=None: jnp.zeros(
      jax.eval_shape(lambda: jax.lax.dot_general(lhs, rhs, dims)).shape, lhs.dtype)
  model = Attention(rngs=nnx.Rngs(0), emb_dim=D, num_query_heads=4, num_kv_heads=2, head_dim=8,
                    out_dot_general=zero)
  assert not np.any(np.asarray(model(jnp.asarray(_x()))))


def test_dense_int8_gradients_use_the_quantized_operands():
  """The backward of an int8 projection is the float backward of the quantized forward:
  dx = g . deq(Q(W))^T and dW = deq(Q(x))^T . g, in float64 to float32 rounding. (A plain
  float backward differs from these by ~1e-2.)"""
  x, g = _x(shape=(2, 5, 16)), _x(seed=4, shape=(2, 5, 4, 3))
  kernel = jnp.asarray(_x(seed=5, shape=(16, 4, 3)))
  loss = lambda x, w: jnp.sum(projection_dot_general("int8")(
      x, w, (((2,), (0,)), ((), ()))) * g)
  dx, dw = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), kernel)
  xq, wq = int8_operands_np(x, np.asarray(kernel, np.float64), 1)
  g64 = np.asarray(g, np.float64)
  want_dx = np.tensordot(g64, wq, axes=([2, 3], [1, 2]))  # [2, 5, 16]
  want_dw = np.tensordot(xq, g64, axes=([0, 1], [0, 1]))  # [16, 4, 3]
  assert _rel(dx, want_dx) < 1e-5 and _rel(dw, want_dw) < 1e-5
  float_dw = np.tensordot(np.asarray(x, np.float64), g64, axes=([0, 1], [0, 1]))
  assert _rel(dw, float_dw) > 1e-3


def test_int8_layer_gradients_are_finite_and_close_to_float():
  """Through the whole layer: every parameter gets a finite gradient within a few percent of
  the float layer's."""
  kw = dict(emb_dim=D, num_query_heads=4, num_kv_heads=2, head_dim=8, use_bias=True)
  x = jnp.asarray(_x())
  cot = jnp.asarray(_x(seed=3))

  def grads(model):
    loss = lambda m: jnp.sum(m(x) * cot)
    return nnx.jit(nnx.grad(loss))(model)

  g8 = nnx.state(grads(Attention(rngs=nnx.Rngs(0), quantization="int8", **kw)), nnx.Param)
  gf = nnx.state(grads(Attention(rngs=nnx.Rngs(0), **kw)), nnx.Param)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g8),
                               jax.tree_util.tree_leaves_with_path(gf)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), path
    assert np.max(np.abs(a - b)) <= 5e-2 * np.max(np.abs(b)), jax.tree_util.keystr(path)


@pytest.mark.parametrize("kv_quant", [None, "int8"], ids=["float_cache", "int8_cache"])
def test_int8_prefill_decode_equals_train(kv_quant):
  """The cached modes run the same quantized projections (activations are quantized per
  token, so batching and caching do not change them); with an int8 KV cache too, within the
  cache's own bound (tests/layers/test_modes.py: 2e-2 of max |ref|)."""
  from meshattn.kvcache import KVQuant
  model = Attention(rngs=nnx.Rngs(0), emb_dim=D, num_query_heads=4, num_kv_heads=2, head_dim=8,
                    quantization="int8", kv_quant=KVQuant(kv_quant) if kv_quant else None)
  x = jnp.asarray(_x())
  train = nnx.jit(lambda m, x: m(x))(model, x)
  step = nnx.jit(lambda m, x, mode: m(x, model_mode=mode), static_argnames="mode")
  model.init_cache(B, 16)
  outs = [step(model, x[:, :5], "prefill")]
  outs += [step(model, x[:, t:t + 1], "autoregressive") for t in range(5, T)]
  got = jnp.concatenate(outs, axis=1)
  if kv_quant is None:
    np.testing.assert_allclose(got, train, rtol=1e-5, atol=1e-5)
  else:
    assert _rel(got, np.asarray(train, np.float64)) < 2e-2


def test_int8_from_config_and_bad_values():
  cfg = load_config("tiny", "quantization=int8")
  model = Attention(cfg, rngs=nnx.Rngs(0))
  assert model.settings.quantization == "int8"
  assert model.out.dot_general is not jax.lax.dot_general
  with pytest.raises(ConfigError, match="quantization: 'int4' is not one of"):
    load_config("tiny", "quantization=int4")
  with pytest.raises(ValueError, match=r"quantization='fp8': allowed \['', 'int8'\]"):
    Attention(rngs=nnx.Rngs(0), emb_dim=D, num_query_heads=4, quantization="fp8")
  with pytest.raises(ValueError, match="not both"):
    Attention(rngs=nnx.Rngs(0), emb_dim=D, num_query_heads=4, quantization="int8",
              qkv_dot_general=jax.lax.dot_general)
  with pytest.raises(ConfigError, match="quantization: 'int8' runs integer matmuls and takes no "
                                        "matmul_precision"):
    load_config("tiny", "quantization=int8", "matmul_precision=highest")
  with pytest.raises(ValueError, match="takes no precision"):
    Attention(rngs=nnx.Rngs(0), emb_dim=D, num_query_heads=4, quantization="int8",
              precision=jax.lax.Precision.HIGHEST)


def test_int8_cached_modes_take_numpy_inputs():
  model = Attention(rngs=nnx.Rngs(0), emb_dim=D, num_query_heads=4, num_kv_heads=2, head_dim=8,
                    quantization="int8")
  model.init_cache(B, 16)
  assert model(_x(), model_mode="prefill").shape == (B, T, D)


@pytest.mark.parametrize("topology", [(2, 2, 1, 2), (1, 2, 1, 4)], ids=["d2f2t2", "f2t4"])
def test_int8_sharded_matches_unsharded(topology):
  """Forward and input gradient of the int8 layer with parameters placed by the logical rules
  (fsdp shards the contracted embed axis of the q/k/v kernels, tensor their heads) equal the
  single-device layer: the per-token and per-feature maxima do not depend on the placement."""
  from meshattn.sharding import shard_module
  mesh = mesh_of(*topology)
  kw = dict(emb_dim=D, num_query_heads=8, num_kv_heads=4, head_dim=8, quantization="int8")
  x = jnp.asarray(_x(shape=(8, T, D)))
  cot = jnp.asarray(_x(seed=3, shape=(8, T, D)))

  @nnx.jit
  def fwd_and_grad(model, x):
    return nnx.value_and_grad(lambda x: jnp.sum(model(x) * cot))(x)

  reference = Attention(rngs=nnx.Rngs(0), **kw)
  ref_loss, ref_gx = fwd_and_grad(reference, x)
  sharded = shard_module(Attention(mesh=mesh, rngs=nnx.Rngs(0), **kw), mesh,
                         reference.settings.logical_axis_rules)
  loss, gx = fwd_and_grad(sharded, x)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(gx, ref_gx, rtol=1e-5, atol=1e-5)
