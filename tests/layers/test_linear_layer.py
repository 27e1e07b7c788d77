"""Linear-attention layers (attention_type 'linear', issue 18): the layer against float64
NumPy (projections, RoPE, the masked quadratic form, output gate, output projection), prefill
+ continued prefill + decode through the state cache == train, sharded == unsharded (outputs,
gradients, decode on a mesh), and misuse raising before anything runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.kernel_checks import rel_err
from helpers.layer_params import randomize
from helpers.linear_np import linear_attention_np
from helpers.numpy_reference import apply_rope_np
from meshattn.configs import ConfigError, load_config
from meshattn.kvcache import LinearStateCache
from meshattn.kvcache.step_checks import StepRejected
from meshattn.layers import Attention
from meshattn.layers.linear import LinearSpec
from meshattn.layers.serving import jit_step
from meshattn.sharding import create_mesh, shard_module

EMB, N, K, H = 16, 4, 2, 8
SPEC = LinearSpec(chunk_size=3, decay=(0.9, 0.7))
# Row 0: two packed sequences and a padding token; row 1: one sequence.
SEGMENTS = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 0], [1] * 10], np.int32)  # [B, T]
POSITIONS = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0], list(range(10))], np.int32)  # [B, T]


def build(mesh=None, gate="elementwise"):
  return Attention(mesh=mesh, rngs=nnx.Rngs(0), emb_dim=EMB, num_query_heads=N, num_kv_heads=K,
                   head_dim=H, linear=SPEC, attention_output_gate=gate)


def tokens(batch=2, length=10, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, length, EMB))  # [B, T, D]


def layer_np(p, x, positions, segments):
  """The layer in float64: q/k/v projections, RoPE, linear attention, gate, out projection."""
  x = np.asarray(x, np.float64)
  q = apply_rope_np(np.einsum("btd,dnh->btnh", x, p["query.kernel"]), positions, None)
  k = apply_rope_np(np.einsum("btd,dkh->btkh", x, p["key.kernel"]), positions, None)
  v = np.einsum("btd,dkh->btkh", x, p["value.kernel"])
  context = linear_attention_np(q, k, v, decay=SPEC.decay, scale=H ** -0.5, segment_ids=segments)
  gate = 1 / (1 + np.exp(-np.einsum("btd,dnh->btnh", x, p["gate.kernel"])))
  return np.einsum("btnh,nhd->btd", context * gate, p["out.kernel"])


@nnx.jit
def train(model, x, positions, segments):
  return model(x, inputs_positions=positions, decoder_segment_ids=segments, model_mode="train")


def test_train_matches_float64_layer():
  model = build()
  params = randomize(model, seed=3)
  x = tokens()
  got = train(model, x, POSITIONS, SEGMENTS)
  want = layer_np(params, x, POSITIONS, SEGMENTS)
  assert rel_err(got, want) < 1e-5
  assert np.all(np.asarray(got)[0, -1] == 0)  # padding outputs zeros (the output bias is off)


@jit_step(static_argnames="mode")
def step(model, x, seg, mode, slots=None):
  return model(x, decoder_segment_ids=seg, model_mode=mode, slots=slots)


def test_prefill_continue_decode_equal_train():
  """Slot 0: a 3-token prompt (right-padded to 5), a 2-token continuation, then decode;
  slot 1: a 5-token prompt, then decode. A step past max_length is rejected and leaves the
  state unchanged."""
  model = build()
  randomize(model, seed=4)
  x = tokens()
  want = np.asarray(train(model, x, None, None))
  cache = model.init_cache(2, 8)
  assert isinstance(cache, LinearStateCache)
  seg = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
  first = step(model, x[:, :5], jnp.asarray(seg), "prefill")
  second = step(model, x[:1, 3:5], None, "prefill", slots=jnp.asarray([0]))
  assert np.asarray(cache.lengths[...]).tolist() == [5, 5]
  decoded = [step(model, x[:, t:t + 1], None, "autoregressive") for t in range(5, 8)]
  held = lambda: [np.asarray(v[...]) for v in (cache.kv, cache.norm, cache.lengths)]
  before = held()
  with pytest.raises(StepRejected, match="max_length=8"):
    step(model, x[:, 8:9], None, "autoregressive")
  for now, then in zip(held(), before):
    np.testing.assert_array_equal(now, then)
  assert rel_err(first[:, :3], want[:, :3]) < 1e-5 and rel_err(first[1], want[1, :5]) < 1e-5
  assert np.all(np.asarray(first)[0, 3:] == 0)
  assert rel_err(second[0], want[0, 3:5]) < 1e-5
  assert rel_err(np.concatenate(decoded, axis=1), want[:, 5:8]) < 1e-5


def test_sharded_equals_unsharded():
  """data 2 x context 2 x tensor 2: train outputs and gradients (params and inputs) equal the
  unsharded layer's; gate.kernel is sharded like query.kernel and the state by kv heads; a
  prefill + decode on the mesh equals the unsharded train outputs."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = create_mesh({"mesh_axes": ("data", "fsdp", "context", "tensor", "autoregressive"),
                      "ici_data_parallelism": 2, "ici_context_parallelism": 2,
                      "ici_tensor_parallelism": 2})
  x = tokens(4, 8)
  seg = jnp.asarray(np.tile(SEGMENTS[:, 2:], (2, 1)))  # [4, 8]
  cot = jax.random.normal(jax.random.key(9), x.shape)

  @nnx.jit
  def grads(model, x, seg):
    def loss(model, x):
      out = model(x, decoder_segment_ids=seg, model_mode="train")
      return jnp.sum(out * cot), out
    (_, out), g = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return out, g

  results = []
  for m in (None, mesh):
    model = build(m)
    if m is not None:
      shard_module(model, m, model.settings.logical_axis_rules)
    results.append(grads(model, x, seg))
  (out, (g_params, g_x)), (s_out, (s_params, s_gx)) = results
  np.testing.assert_allclose(s_out, out, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s_gx, g_x, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s_params,
               g_params)
  assert model.gate.kernel[...].sharding.spec == model.query.kernel[...].sharding.spec
  assert "tensor" in tuple(model.gate.kernel[...].sharding.spec)
  # Serving on the mesh: rows 1 and 3 hold one sequence (segment 1 throughout), so their
  # train outputs are what a prefill + decode of their first tokens gives.
  model.init_cache(4, 12)
  assert tuple(model.cache.kv[...].sharding.spec)[1] == "tensor"  # the state split by kv heads
  served = [step(model, x[:, :5], None, "prefill"), step(model, x[:, 5:6], None, "autoregressive")]
  np.testing.assert_allclose(np.concatenate(served, axis=1)[1::2], np.asarray(out)[1::2, :6],
                             rtol=1e-5, atol=1e-6)


def test_misuse_raises():
  with pytest.raises(ValueError, match="attention_sink"):
    Attention(rngs=nnx.Rngs(0), emb_dim=EMB, num_query_heads=N, num_kv_heads=K, linear=SPEC,
              attention_sink=True)
  with pytest.raises(ValueError, match="score_mod"):
    Attention(rngs=nnx.Rngs(0), emb_dim=EMB, num_query_heads=N, num_kv_heads=K, linear=SPEC,
              score_mod=lambda s, *a: s)
  model = build(gate="none")
  with pytest.raises(ValueError, match="mask"):
    model(tokens(), mask=jnp.ones((1, 1, 10, 10), bool))
  for override, key in ((["attention_sink=true"], "attention_sink"),
                        (["attn_logits_soft_cap=30.0"], "attn_logits_soft_cap"),
                        (["linear_feature_map=identity"], "linear_normalize"),
                        (["linear_decay_per_head=[0.9, 0.8, 0.7]"], "linear_decay_per_head"),
                        (["linear_decay=1.5"], "linear_decay")):
    with pytest.raises(ConfigError, match=key):
      load_config("base", "attention_layer_pattern=[linear, global]", "num_kv_heads=2",
                  *override, num_devices=1)
