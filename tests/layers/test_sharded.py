"""Sharded equals unsharded: outputs and gradients over several mesh topologies.

Every topology runs the same jitted forward+backward of the layer with its
parameters placed by the logical rules, and compares with the same layer on
one device. Parameter placements are checked against what the rules say.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from meshattn.layers import Attention, MaskSpec
from meshattn.sharding import get_param_shardings, shard_module

from helpers.meshes import mesh_of

# (data, fsdp, context, tensor) on 8 devices.
TOPOLOGIES = [(8, 1, 1, 1), (1, 8, 1, 1), (2, 2, 1, 2), (1, 2, 1, 4), (2, 1, 2, 2), (1, 1, 2, 4)]


def make_mesh(data, fsdp, context, tensor):
  return mesh_of(data, fsdp, context, tensor)


def build(mesh, num_kv_heads, **kw):
  return Attention(mesh=mesh, rngs=nnx.Rngs(0), emb_dim=32, num_query_heads=8,
                   num_kv_heads=num_kv_heads, head_dim=8, use_bias=True, **kw)


def loss_and_grads(model, x, pos, seg):
  """(out [B, T, D], d loss / d x, d loss / d params) with one fixed cotangent."""
  cot = jax.random.normal(jax.random.key(7), x.shape, jnp.float32)  # [B, T, D]

  @nnx.jit
  def step(model, x):
    def loss(model, x):
      out = model(x, x, inputs_positions=pos, decoder_segment_ids=seg, model_mode="train")
      return jnp.sum(out * cot), out
    (_, out), (g_params, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return out, g_x, g_params

  return step(model, x)


def inputs():
  x = jax.random.normal(jax.random.key(1), (8, 16, 32), jnp.float32)  # [B, T, D]
  pos = jnp.concatenate([jnp.arange(10), jnp.arange(6)])[None].repeat(8, 0)  # [B, T] packed
  seg = jnp.concatenate([jnp.ones(10, jnp.int32), 2 * jnp.ones(6, jnp.int32)])[None].repeat(8, 0)
  return x, pos, seg


LAYER_KW = dict(mask=MaskSpec("local_sliding", window=5), attention_sink=True, use_qk_norm=True)


@functools.cache
def unsharded_result(kv_heads):
  """(rules, out, d/dx, d/dparams) of the unsharded layer: one run per head layout, shared
  by the topologies (each xdist worker computes it once)."""
  x, pos, seg = inputs()
  reference = build(None, kv_heads, **LAYER_KW)
  out, g_x, g_p = loss_and_grads(reference, x, pos, seg)
  return (reference.settings.logical_axis_rules, np.asarray(out), np.asarray(g_x),
          jax.tree.map(np.asarray, g_p))


@pytest.mark.parametrize("kv_heads", [8, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("topology", TOPOLOGIES, ids=lambda t: "d%df%dc%dt%d" % t)
def test_sharded_matches_unsharded(topology, kv_heads):
  mesh = make_mesh(*topology)
  x, pos, seg = inputs()
  rules, ref_out, ref_gx, ref_gp = unsharded_result(kv_heads)

  model = shard_module(build(mesh, kv_heads, **LAYER_KW), mesh, rules)
  out, g_x, g_p = loss_and_grads(model, x, pos, seg)

  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(g_x, ref_gx, rtol=1e-5, atol=1e-5)
  for (path, g), (_, ref_g) in zip(jax.tree_util.tree_leaves_with_path(g_p),
                                    jax.tree_util.tree_leaves_with_path(ref_gp)):
    np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  # The output lands with the input rule: batch over (data, fsdp).
  batch_axes = tuple(a for a, n in zip(("data", "fsdp"), topology[:2]) if n > 1)
  expected = NamedSharding(mesh, P(batch_axes or None, "context" if topology[2] > 1 else None))
  assert out.sharding.is_equivalent_to(expected, out.ndim), out.sharding


def test_param_placement_follows_rules():
  """query/key/value/out kernels: embed on fsdp, heads on tensor; kv heads that
  do not divide the tensor size stay replicated (the GQA rule)."""
  mesh = make_mesh(1, 2, 1, 4)
  rules = build(None, 2).settings.logical_axis_rules
  model = shard_module(build(mesh, 2, attention_sink=True), mesh, rules)
  want = {
      ("query", "kernel"): P("fsdp", "tensor", None),
      ("query", "bias"): P("tensor", None),
      ("key", "kernel"): P("fsdp", None, None),  # 2 kv heads, tensor=4: replicated
      ("value", "kernel"): P("fsdp", None, None),
      ("out", "kernel"): P("tensor", None, "fsdp"),
      ("out", "bias"): P("fsdp"),
      ("sinks",): P("tensor"),
  }
  state = nnx.state(model, nnx.Param)
  shardings = get_param_shardings(state, mesh, rules)
  for path, spec in want.items():
    node, sharding = state, shardings
    for part in path:
      node, sharding = node[part], sharding[part]
    arr = node[...]
    assert arr.sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim), (path, arr.sharding)
    assert sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim), (path, sharding)


def _index_masked_kernel(query, key, value, *, q_positions, kv_positions, **kwargs):
  """The reference, masking by token index within the call (as flash kernels do)."""
  from meshattn.layers import dot_product_attention
  b, t, s = query.shape[0], query.shape[1], key.shape[1]
  q_idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))  # [b, T] local indices
  kv_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))  # [b, S]
  return dot_product_attention(query, key, value, q_positions=q_idx, kv_positions=kv_idx, **kwargs)


@pytest.mark.parametrize("topology", [(2, 1, 2, 2), (1, 1, 4, 2)], ids=lambda t: "d%df%dc%dt%d" % t)
def test_index_masked_kernel_is_not_split_over_context(topology, monkeypatch):
  """A flash-style kernel sees whole query rows under a context-sharded mesh; split, a later
  shard's queries would be masked as if they started at position 0."""
  mesh = make_mesh(*topology)
  x = jax.random.normal(jax.random.key(1), (4, 16, 32), jnp.float32)  # [B, T, D]
  pos = jnp.broadcast_to(jnp.arange(16), (4, 16))  # train mode: token indices
  reference = build(None, 2)
  want = nnx.jit(lambda m, x: m(x, inputs_positions=pos))(reference, x)
  model = shard_module(build(mesh, 2), mesh, reference.settings.logical_axis_rules)
  monkeypatch.setattr(Attention, "_kernel_fn",
                      lambda self, mode, features, lengths=None: (_index_masked_kernel, "whole"))
  got = nnx.jit(lambda m, x: m(x, inputs_positions=pos))(model, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The same kernel with the query length split over `context` is wrong: the test can fail.
  monkeypatch.setattr(Attention, "_kernel_fn",
                      lambda self, mode, features, lengths=None: (_index_masked_kernel, "split"))
  wrong = nnx.jit(lambda m, x: m(x, inputs_positions=pos))(model, x)
  assert not np.allclose(wrong, want, rtol=1e-3, atol=1e-3)
