"""Ring attention (kernels/ring.py) against the reference kernel: unsharded (one step), and
through the layer on meshes that split the sequence over `context` (2, 4 and 8 shards),
outputs and gradients, MHA/GQA/MQA, every mask type, packed segments, soft cap and sinks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from meshattn.layers import Attention, KernelOptions, MaskSpec, dot_product_attention
from meshattn.layers.kernels import registry
from meshattn.layers.kernels.train.ring import ring_attention
from meshattn.sharding import shard_module

from helpers.meshes import mesh_of


def make_mesh(data, context, tensor):
  return mesh_of(data=data, context=context, tensor=tensor)


def _inputs(kv_heads, b=2, t=16, n=4, h=8, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(k1, (b, t, n, h), jnp.float32)
  k = jax.random.normal(k2, (b, t, kv_heads, h), jnp.float32)
  v = jax.random.normal(k3, (b, t, kv_heads, h), jnp.float32)
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  return q, k, v, idx


MASKS = {"causal": MaskSpec("global"), "window": MaskSpec("local_sliding", window=5),
         "chunk": MaskSpec("chunk", chunk=6), "full": MaskSpec("full")}


@pytest.mark.parametrize("mask", sorted(MASKS))
def test_one_step_matches_reference(mask):
  """Without a ring (axis_name None) it is the reference, with segments, soft cap and sinks."""
  q, k, v, idx = _inputs(2)
  seg = jnp.asarray([[1] * 9 + [2] * 6 + [0]] * 2, jnp.int32)
  options = KernelOptions(mask=MASKS[mask], scale=0.3, soft_cap=2.0)
  sinks = jnp.linspace(-1.0, 1.0, 4)
  args = dict(options=options, q_positions=idx, kv_positions=idx, q_segment_ids=seg,
              kv_segment_ids=seg, sinks=sinks)
  got, _ = ring_attention(q, k, v, **args)
  want, _ = dot_product_attention(q, k, v, **args)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ring_inside_shard_map_matches_reference():
  """The kernel alone under shard_map over 8 sequence shards of 2 tokens each, against the
  reference on the whole sequence (the blocks' masks come from the positions that travel)."""
  mesh = make_mesh(1, 8, 1)
  q, k, v, idx = _inputs(1)
  options = KernelOptions(mask=MaskSpec("local_sliding", window=7), scale=0.3)
  want, _ = dot_product_attention(q, k, v, options=options, q_positions=idx, kv_positions=idx)

  def shard(q, k, v, idx):
    return ring_attention(q, k, v, options=options, q_positions=idx, kv_positions=idx,
                          axis_name="context")[0]

  seq = P(None, "context")
  got = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(seq, seq, seq, seq), out_specs=seq,
                              check_vma=False))(q, k, v, idx)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _build(mesh, kv_heads, **kw):
  return Attention(mesh=mesh, rngs=nnx.Rngs(0), emb_dim=32, num_query_heads=8,
                   num_kv_heads=kv_heads, head_dim=8, **kw)


def _loss_and_grads(model, x, seg):
  cot = jax.random.normal(jax.random.key(7), x.shape, jnp.float32)

  @nnx.jit
  def step(model, x):
    def loss(model, x):
      out = model(x, decoder_segment_ids=seg)
      return jnp.sum(out * cot), out
    (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return out, grads

  return step(model, x)


CASES = [  # (topology (data, context, tensor), kv heads, layer keywords)
    ((1, 8, 1), 8, dict(mask=MaskSpec("global"))),
    ((2, 4, 1), 2, dict(mask=MaskSpec("local_sliding", window=5), attention_sink=True)),
    ((1, 2, 4), 1, dict(mask=MaskSpec("chunk", chunk=6), attn_logits_soft_cap=3.0)),
]  # `full` through the layer: test_cross_attention


@pytest.mark.parametrize("topology, kv_heads, kw", CASES,
                         ids=["mha_causal_c8", "gqa_window_sinks_d2c4", "mqa_chunk_cap_c2t4"])
def test_layer_on_context_meshes_matches_reference(topology, kv_heads, kw):
  """The layer with attention="ring" on a context-split mesh equals the unsharded reference
  layer: outputs, input and parameter gradients, with packed segments (one spanning shards)."""
  mesh = make_mesh(*topology)
  x = jax.random.normal(jax.random.key(1), (4, 16, 32), jnp.float32)  # [B, T, D]
  seg = jnp.asarray([[1] * 11 + [2] * 4 + [0]] * 4, jnp.int32)
  reference = _build(None, kv_heads, **kw)
  ref_out, (ref_gp, ref_gx) = _loss_and_grads(reference, x, seg)
  ring = shard_module(_build(mesh, kv_heads, attention="ring", **kw), mesh,
                      reference.settings.logical_axis_rules)
  out, (gp, gx) = _loss_and_grads(ring, x, seg)
  np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, ref_gx, rtol=1e-4, atol=1e-5)
  for (path, g), (_, ref_g) in zip(jax.tree_util.tree_leaves_with_path(nnx.state(gp, nnx.Param)),
                                    jax.tree_util.tree_leaves_with_path(nnx.state(ref_gp, nnx.Param))):
    np.testing.assert_allclose(g, ref_g, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_registry_and_refusals():
  kernel = registry.select("ring", registry.Request("cpu", "train", frozenset({"causal", "gqa"})))
  assert kernel.length_layout == "ring"
  with pytest.raises(ValueError, match=r"'ring' on cpu does not support \['user_mask'\]"):
    registry.select("ring", registry.Request("cpu", "train", frozenset({"causal", "user_mask"})))
  # autoselected never picks the ring: it is a sharding choice, made by name.
  for platform in registry.PLATFORMS:
    assert "ring" not in registry.AUTOSELECT_ORDER[(platform, "train")]
  q, k, v, idx = _inputs(2)
  with pytest.raises(NotImplementedError, match=r"ring attention does not support \['bias'\]"):
    ring_attention(q, k, v, options=KernelOptions(), q_positions=idx, kv_positions=idx,
                   bias=jnp.zeros((1, 1, 16, 16)))


def test_layer_passes_split_blocks_around_the_ring(monkeypatch):
  """Through the registry (Kernel.load imports the function at call time): each shard's kernel
  call holds T / P keys and gets the context axis. Duplicated whole K/V would give the same
  softmax, so the shapes are checked, not only the values."""
  from meshattn.layers.kernels.train import ring as ring_module
  mesh = make_mesh(1, 4, 2)
  seen = []

  def spy(query, key, value, **kwargs):
    seen.append((query.shape[1], key.shape[1], kwargs.get("axis_name")))
    return ring_attention(query, key, value, **kwargs)

  monkeypatch.setattr(ring_module, "ring_attention", spy)
  model = shard_module(_build(mesh, 2, attention="ring"), mesh,
                       _build(None, 2).settings.logical_axis_rules)
  model(jax.random.normal(jax.random.key(1), (4, 16, 32), jnp.float32))
  assert seen == [(4, 4, "context")]


@pytest.mark.parametrize("kv_len", [8, 12], ids=["ring", "gathered"])
def test_cross_attention(kv_len):
  """Keys of another length: split and rotated when the 4 shards divide it (8), gathered when
  they do not (12)."""
  mesh = make_mesh(1, 4, 2)
  x = jax.random.normal(jax.random.key(1), (4, 16, 32), jnp.float32)
  kv = jax.random.normal(jax.random.key(2), (4, kv_len, 32), jnp.float32)
  kw = dict(mask=MaskSpec("full"))
  reference = _build(None, 2, **kw)
  want = reference(x, kv)
  ring = shard_module(_build(mesh, 2, attention="ring", **kw), mesh,
                      reference.settings.logical_axis_rules)
  np.testing.assert_allclose(nnx.jit(lambda m, x, kv: m(x, kv))(ring, x, kv), want,
                             rtol=1e-5, atol=1e-5)


def test_bf16_segments_and_sinks_under_shard_map():
  """bfloat16 inputs, packed segments crossing shard boundaries and sinks, the kernel alone on
  4 shards, against the reference in float32 (bf16 rounding of inputs and output: 2e-2)."""
  mesh = make_mesh(1, 4, 2)
  q, k, v, idx = _inputs(2)
  seg = jnp.asarray([[1] * 5 + [2] * 9 + [0] * 2] * 2, jnp.int32)
  sinks = jnp.linspace(-1.0, 1.0, 4)
  options = KernelOptions(mask=MaskSpec("global"), scale=0.3, soft_cap=2.5)
  bf = lambda x: x.astype(jnp.bfloat16)
  want, _ = dot_product_attention(bf(q).astype(jnp.float32), bf(k).astype(jnp.float32),
                                  bf(v).astype(jnp.float32), options=options, q_positions=idx,
                                  kv_positions=idx, q_segment_ids=seg, kv_segment_ids=seg,
                                  sinks=sinks)

  def shard(q, k, v, idx, seg):
    return ring_attention(q, k, v, options=options, q_positions=idx, kv_positions=idx,
                          q_segment_ids=seg, kv_segment_ids=seg, sinks=sinks,
                          axis_name="context")[0]

  seq = P(None, "context")
  got = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(seq,) * 5, out_specs=seq,
                              check_vma=False))(bf(q), bf(k), bf(v), idx, seg)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)
