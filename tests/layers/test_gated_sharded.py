"""Sharded == unsharded for gated softmax layers (attention_output_gate, issue 18): outputs and
gradients (every parameter, gate.kernel included, and the input) on 8 fake devices equal the
unsharded layer's, for each gate kind, and gate.kernel lands where query.kernel does. (Linear
layers with the gate: test_linear_layer.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.layer_params import randomize
from helpers.meshes import mesh_of
from meshattn.layers import Attention, MaskSpec
from meshattn.sharding import shard_module

EMB, N, K, H, B, T = 16, 4, 2, 8, 4, 8
# Each gate kind on its own (data, fsdp, context, tensor) mesh: the elementwise gate with the
# batch, the sequence and the heads split; the headwise gate with its embed axis on fsdp and
# the heads on tensor 4 (the 2 kv heads then stay replicated).
TOPOLOGIES = {"elementwise": (2, 1, 2, 2), "headwise": (1, 2, 1, 4)}


def build(gate, mesh=None):
  return Attention(mesh=mesh, rngs=nnx.Rngs(0), emb_dim=EMB, num_query_heads=N, num_kv_heads=K,
                   head_dim=H, attention_output_gate=gate, attention_sink=True,
                   attn_logits_soft_cap=5.0, mask=MaskSpec("local_sliding", window=3))


def inputs():
  x = jax.random.normal(jax.random.key(1), (B, T, EMB))  # [B, T, D]
  seg = jnp.asarray(np.repeat([[1] * 5 + [2] * 3], B, axis=0), jnp.int32)  # [B, T] two packed
  cot = jax.random.normal(jax.random.key(2), (B, T, EMB))  # [B, T, D]
  return x, seg, cot


@nnx.jit
def out_and_grads(model, x, seg, cot):
  """(out [B, T, D], d sum(out * cot) / d params, d / d x), in one jit."""
  def loss(model, x):
    out = model(x, decoder_segment_ids=seg, model_mode="train")
    return jnp.sum(out * cot), out
  (_, out), (g_params, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
  return out, g_params, g_x


def as_numpy(out, g_params, g_x):
  named = {".".join(map(str, path)): np.asarray(g[...]) for path, g in nnx.to_flat_state(g_params)}
  return np.asarray(out), named, np.asarray(g_x)


@functools.cache
def unsharded(gate):
  """The unsharded layer's (rules, out, grads by name, d/dx), with random parameters."""
  model = build(gate)
  randomize(model, seed=4)
  return (model.settings.logical_axis_rules, *as_numpy(*out_and_grads(model, *inputs())))


@pytest.mark.parametrize("gate", list(TOPOLOGIES))
def test_sharded_equals_unsharded(gate):
  mesh = mesh_of(*TOPOLOGIES[gate])
  rules, want_out, want_params, want_x = unsharded(gate)
  model = build(gate, mesh)
  randomize(model, seed=4)  # the same values as the unsharded layer's
  shard_module(model, mesh, rules)
  spec = lambda p: tuple(p[...].sharding.spec)
  # The gate shards like the query projection: [D, N, H] (headwise [D, N]) by its leading axes.
  assert spec(model.gate.kernel) == spec(model.query.kernel)[:model.gate.kernel.ndim]
  assert "tensor" in spec(model.gate.kernel)
  out, params, g_x = as_numpy(*out_and_grads(model, *inputs()))
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_x, want_x, rtol=1e-5, atol=1e-6)
  assert set(params) == set(want_params) and "gate.kernel" in params
  for name, g in params.items():
    np.testing.assert_allclose(g, want_params[name], rtol=1e-4, atol=1e-6, err_msg=name)
