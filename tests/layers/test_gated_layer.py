"""The output gate on softmax layers (attention_output_gate, attnax's LITE, issue 18): against
float64 NumPy with sinks, soft cap and a sliding window; prefill + decode == train on the
contiguous, paged and int8 caches; attention_fn composes with it; the attnax drop-in keeps
attnax's error and builds LITE and LINEAR layers. (Sharded == unsharded with the gate:
test_linear_layer.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.kernel_checks import rel_err
from helpers.layer_params import randomize
from helpers.numpy_reference import apply_rope_np, attention_core_np, structural_visible_np
from meshattn.kvcache import KVQuant
from meshattn.layers import Attention, AttentionType, MaskSpec, MultiHeadAttention

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


@pytest.mark.parametrize("gate", ["elementwise", "headwise"])
def test_train_matches_float64_layer(gate):
  model = build(gate)
  p = randomize(model, seed=2)
  x = tokens()
  xf = np.asarray(x, np.float64)
  pos = np.broadcast_to(np.arange(T), (2, T))
  q = apply_rope_np(np.einsum("btd,dnh->btnh", xf, p["query.kernel"]), pos, None)
  k = apply_rope_np(np.einsum("btd,dkh->btkh", xf, p["key.kernel"]), pos, None)
  v = np.einsum("btd,dkh->btkh", xf, p["value.kernel"])
  visible = structural_visible_np("local_sliding", T, T, window=WINDOW)
  context, _ = attention_core_np(q, k, v, scale=H ** -0.5, visible=visible, soft_cap=CAP,
                                 sinks=p["sinks"])
  logits = np.einsum("btd,d...->bt...", xf, p["gate.kernel"])  # [B, T, N, H] or [B, T, N]
  weights = 1 / (1 + np.exp(-logits))
  context = context * (weights if gate == "elementwise" else weights[..., None])
  want = np.einsum("btnh,nhd->btd", context, p["out.kernel"])
  assert rel_err(train(model, x), want) < 1e-5


@pytest.mark.parametrize("cache", ["contiguous", "paged", "int8"])
def test_prefill_decode_equal_train(cache):
  """Prefill 5 tokens, decode 3: within 1e-5 (contiguous; paged with the headwise gate) or the
  int8 bound 2e-2 (the gate applies after the context leaves the cache's rotated basis)."""
  model = build("headwise" if cache == "paged" else "elementwise",
                kv_quant=KVQuant("int8") if cache == "int8" else None)
  randomize(model, seed=3)
  x = tokens()
  want = train(model, x)
  made = model.init_cache(2, 12, paged=cache == "paged")
  if cache == "paged":
    made.reserve_for_step(np.arange(2), np.full(2, T))
  got = jnp.concatenate([run(model, x[:, :5], "prefill")] +
                        [run(model, x[:, t:t + 1], "autoregressive") for t in range(5, T)], axis=1)
  assert rel_err(got, want) < (2e-2 if cache == "int8" else 1e-5)


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
