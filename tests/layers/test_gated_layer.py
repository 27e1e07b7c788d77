"""The output gate on softmax layers (attention_output_gate, attnax's LITE, issue 18): against
float64 NumPy with sinks, soft cap and a sliding window, outputs and gradients (against central
differences of the float64 layer); prefill + decode == train on the ring-buffer, contiguous,
paged, int8 and int4 caches; attention_fn composes with it; the attnax drop-in keeps attnax's
error and builds LITE and LINEAR layers; a hybrid decoder (linear + gated softmax layers) serves
through jit_step (and the Engine: tests/serving/test_engine_hybrid.py). (Sharded == unsharded:
test_gated_sharded for softmax layers, test_linear_layer for linear ones.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.kernel_checks import rel_err
from helpers.layer_params import randomize
from helpers.numpy_reference import apply_rope_np, attention_core_np, structural_visible_np
from meshattn.configs import load_config
from meshattn.kvcache import KVCache, KVQuant, LinearStateCache
from meshattn.layers import Attention, AttentionType, MaskSpec, MultiHeadAttention
from meshattn.layers.decoder import Decoder
from meshattn.layers.serving import jit_step

EMB, N, K, H, T = 16, 4, 2, 8, 8
WINDOW, CAP = 3, 5.0


def build(gate="elementwise", mesh=None, **kw):
  return Attention(mesh=mesh, rngs=nnx.Rngs(0), emb_dim=EMB, num_query_heads=N, num_kv_heads=K,
                   head_dim=H, attention_output_gate=gate, attention_sink=True,
                   attn_logits_soft_cap=CAP, mask=MaskSpec("local_sliding", window=WINDOW), **kw)


def tokens(batch=2, length=T, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, length, EMB))  # [B, T, D]


@nnx.jit
def train(model, x):
  return model(x, model_mode="train")


@nnx.jit(static_argnames="mode")
def run(model, x, mode):
  return model(x, model_mode=mode)


def layer_np(p, x, gate):
  """The gated softmax layer in float64: projections, RoPE, windowed soft-capped attention
  with sinks, sigmoid(x W_gate) on the context (per channel or per head), out projection."""
  x = np.asarray(x, np.float64)
  pos = np.broadcast_to(np.arange(x.shape[1]), x.shape[:2])
  q = apply_rope_np(np.einsum("btd,dnh->btnh", x, p["query.kernel"]), pos, None)
  k = apply_rope_np(np.einsum("btd,dkh->btkh", x, p["key.kernel"]), pos, None)
  v = np.einsum("btd,dkh->btkh", x, p["value.kernel"])
  visible = structural_visible_np("local_sliding", x.shape[1], x.shape[1], window=WINDOW)
  context, _ = attention_core_np(q, k, v, scale=H ** -0.5, visible=visible, soft_cap=CAP,
                                 sinks=p["sinks"])
  logits = np.einsum("btd,d...->bt...", x, p["gate.kernel"])  # [B, T, N, H] or [B, T, N]
  weights = 1 / (1 + np.exp(-logits))
  context = context * (weights if gate == "elementwise" else weights[..., None])
  return np.einsum("btnh,nhd->btd", context, p["out.kernel"])


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_train_matches_float64_layer(gate):
  model = build(gate)
  p = randomize(model, seed=2)
  x = tokens()
  assert rel_err(train(model, x), layer_np(p, x, gate)) < 1e-5


@nnx.jit
def grads(model, x, cot):
  """d sum(out * cot) / d (params, x), in one jit."""
  def loss(model, x):
    return jnp.sum(model(x, model_mode="train") * cot)
  return nnx.grad(loss, argnums=(0, 1))(model, x)


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_gradients_match_central_differences_of_the_float64_layer(gate):
  """Per tensor (the input and every parameter, gate.kernel included), JAX's gradient in a
  random direction equals the float64 layer's central difference in that direction."""
  model = build(gate)
  p = randomize(model, seed=5)
  x = tokens()
  rng = np.random.default_rng(12)
  cot = rng.normal(size=x.shape).astype(np.float32)  # [B, T, D]; exact in float64 too
  g_params, g_x = grads(model, x, jnp.asarray(cot))
  got = {".".join(map(str, path)): np.asarray(g[...], np.float64)
         for path, g in nnx.to_flat_state(g_params)}
  got["x"] = np.asarray(g_x, np.float64)
  at = {**p, "x": np.asarray(x, np.float64)}
  assert set(got) == set(at), (sorted(got), sorted(at))

  def loss_np(moved):
    values = {**at, **moved}
    return np.sum(layer_np(values, values["x"], gate) * cot)

  eps = 1e-4
  for name, value in at.items():
    direction = rng.normal(size=value.shape)
    predicted = float(np.sum(got[name] * direction))
    measured = (loss_np({name: value + eps * direction}) -
                loss_np({name: value - eps * direction})) / (2 * eps)
    assert abs(predicted - measured) < 1e-4 * max(1.0, abs(measured)), (name, predicted, measured)


# name: (gate, init_cache keywords, kv_quant, bound on the error vs train). The quantized
# caches are rings too (the layer's default for its window): 8 tokens through 3 entries.
CACHES = {
    "ring": ("elementwise", dict(ring_buffer=True), None, 1e-5),
    "contiguous": ("headwise", dict(ring_buffer=False), None, 1e-5),
    "paged": ("headwise", dict(paged=True), None, 1e-5),
    "int8": ("elementwise", {}, KVQuant("int8"), 2e-2),
    "int4": ("headwise", {}, KVQuant("int4"), 0.25),
}


@pytest.mark.parametrize("cache", list(CACHES))
def test_prefill_decode_equal_train(cache):
  """Prefill 5 tokens, decode 3: within 1e-5, or the stated int8 / int4 bounds (2e-2, 0.25;
  the gate applies after the context leaves the quantized cache's rotated basis)."""
  gate, kind, quant, bound = CACHES[cache]
  model = build(gate, kv_quant=quant)
  randomize(model, seed=3)
  x = tokens()
  want = train(model, x)
  made = model.init_cache(2, 12, **kind)
  if cache == "paged":
    made.reserve_for_step(np.arange(2), np.full(2, T))
  else:  # a ring holds the window only, so the decode steps overwrite its entries
    assert made.capacity == (WINDOW if cache in ("ring", "int8", "int4") else 12)
  got = jnp.concatenate([run(model, x[:, :5], "prefill")] +
                        [run(model, x[:, t:t + 1], "autoregressive") for t in range(5, T)], axis=1)
  assert rel_err(got, want) < bound


def test_attention_fn_composes_and_attnax_lite_keeps_its_error():
  """meshattn's gate multiplies what attention_fn returns (Flax's own function gives the
  built-in kernel's result); attnax's LITE + attention_fn raises as attnax does."""
  x = tokens()
  kw = dict(emb_dim=EMB, num_query_heads=N, head_dim=H, attention_output_gate="elementwise",
            mask=MaskSpec("full"))
  builtin = Attention(rngs=nnx.Rngs(0), **kw)
  custom = Attention(rngs=nnx.Rngs(0), attention_fn=nnx.dot_product_attention, **kw)
  np.testing.assert_allclose(custom(x), builtin(x), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="attention_fn and attention_type=LITE"):
    MultiHeadAttention(N, EMB, attention_type=AttentionType.LITE, rngs=nnx.Rngs(0),
                       attention_fn=lambda q, k, v, **kw: nnx.dot_product_attention(q, k, v))
  lite = MultiHeadAttention(N, EMB, attention_type="lite", decode=False, rngs=nnx.Rngs(0))
  assert lite.gate.kernel.shape == (EMB, N, EMB // N)
  linear = MultiHeadAttention(N, EMB, attention_type="linear", linear_attention_chunk_size=4,
                              decode=False, rngs=nnx.Rngs(0))
  assert linear.settings.linear.chunk_size == 4
  whole = nnx.jit(lambda m, x: m(x))(linear, x)  # [B, T, D]
  linear.init_cache(x.shape)  # Flax's decode: one token per call through the state cache
  decode = nnx.jit(lambda m, x: m(x, decode=True))
  steps = jnp.concatenate([decode(linear, x[:, t:t + 1]) for t in range(T)], axis=1)
  np.testing.assert_allclose(steps, whole, rtol=1e-5, atol=1e-6)


def test_hybrid_decoder_serves_through_jit_step():
  """The hybrid-linear preset, shrunk: the layers' own steps serve it (prefill 5 tokens +
  decode 3 under jit_step give the train logits); the Engine serves it too
  (tests/serving/test_engine_hybrid.py)."""
  cfg = load_config("hybrid-linear", "emb_dim=16", "mlp_dim=32", "num_query_heads=4",
                    "num_kv_heads=2", "head_dim=8", "num_decoder_layers=4", "vocab_size=40",
                    "max_target_length=32", "max_prefill_predict_length=32",
                    "paged_kv_cache=true", num_devices=1)
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(3), (2, T), 0, cfg.vocab_size)  # [B, T]
  want = nnx.jit(lambda m, ids: m(ids, model_mode="train"))(model, ids)  # [B, T, V]
  caches = model.init_cache(2, 16, paged=False)
  assert [type(c) for c in caches] == [LinearStateCache] * 3 + [KVCache]

  @jit_step(static_argnames="mode")
  def step(model, ids, mode):
    return model(ids, model_mode=mode)

  got = jnp.concatenate([step(model, ids[:, :5], "prefill")] +
                        [step(model, ids[:, t:t + 1], "autoregressive") for t in range(5, T)],
                        axis=1)  # [B, T, V]
  assert rel_err(got, want) < 1e-5
