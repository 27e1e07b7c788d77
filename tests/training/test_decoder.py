"""The decoder LM (layers/decoder.py) against a float64 NumPy decoder built on the layer's
NumPy reference; sharded (8 devices, remat) against unsharded, outputs and gradients;
train-mode logits against prefill-then-decode through every block's cache on the mesh;
the presets build."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.numpy_reference import attention_layer_np, rms_norm_np
from meshattn.configs import load_config
from meshattn.layers.decoder import Decoder
from meshattn.layers.serving import jit_step
from meshattn.scripts.train_loop import model_flops_per_token
from meshattn.sharding import create_mesh, shard_module

MESH = ["ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2"]
# Gemma-2-style alternation (a window of 4 on even blocks), GQA 4 / 2, a small vocab.
MODEL = ["attention_layer_pattern=[local_sliding, global]", "sliding_window_size=4",
         "num_decoder_layers=2", "vocab_size=40", "mlp_dim=96"]
BATCH, LENGTH = 4, 12


def _silu(x):
  return x / (1 + np.exp(-x))


def decoder_np(params: dict, cfg, tokens, positions, segment_ids) -> np.ndarray:
  """Logits [B, T, V] in float64, from the math: embed, blocks (RMSNorm, attention,
  RMSNorm, SwiGLU) with residuals, final RMSNorm, tied or separate logits."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  eps = cfg.normalization_layer_epsilon
  x = p["embedding"][tokens]  # [B, T, D]
  pattern = cfg.attention_layer_pattern or (cfg.attention_type,)
  for i in range(cfg.num_decoder_layers):
    b = f"blocks.{i}."
    attn = {k[len(b + "attention."):]: v for k, v in p.items() if k.startswith(b + "attention.")}
    kind = pattern[i % len(pattern)]
    h = rms_norm_np(x, p[b + "pre_attention_norm.scale"], eps)
    out, _ = attention_layer_np(
        attn, h, num_query_heads=cfg.num_query_heads, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, q_positions=positions, segment_ids=(segment_ids, segment_ids),
        attention_type=kind, window=cfg.sliding_window_size if kind == "local_sliding" else None,
        scale=cfg.head_dim ** -0.5)
    x = x + out
    h = rms_norm_np(x, p[b + "pre_mlp_norm.scale"], eps)
    hidden = _silu(h @ p[b + "mlp.wi_0.kernel"]) * (h @ p[b + "mlp.wi_1.kernel"])
    x = x + hidden @ p[b + "mlp.wo.kernel"]
  y = rms_norm_np(x, p["final_norm.scale"], eps)
  if cfg.logits_via_embedding:
    return y @ p["embedding"].T / np.sqrt(cfg.emb_dim)
  return y @ p["logits.kernel"]


def _params(model) -> dict:
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {".".join(map(str, path)): np.asarray(v.get_value()) for path, v in flat}


def _packed_inputs(vocab):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (BATCH, LENGTH)).astype(np.int32)
  # Two packed sequences (7 + 4 tokens) and one padding token per row.
  positions = np.concatenate([np.arange(7), np.arange(4), [0]])[None].repeat(BATCH, 0)
  segment_ids = np.concatenate([np.ones(7), np.full(4, 2), [0]])[None].repeat(BATCH, 0)
  return tokens, positions.astype(np.int32), segment_ids.astype(np.int32)


def test_decoder_matches_numpy_and_sharded_remat_gradients():
  cfg = load_config("tiny-lm", *MODEL, "logits_via_embedding=false", *MESH)
  sharded_cfg = cfg.replace(remat_policy="minimal")
  mesh = create_mesh(cfg)
  single = Decoder(cfg, rngs=nnx.Rngs(0))
  sharded = Decoder(sharded_cfg, mesh=mesh, rngs=nnx.Rngs(0))
  shard_module(sharded, mesh, sharded.rules)
  tokens, positions, segment_ids = _packed_inputs(cfg.vocab_size)
  want = decoder_np(_params(single), cfg, tokens, positions, segment_ids)
  real = segment_ids > 0  # padding rows of the logits are not defined by the reference
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(want.shape), jnp.float32)

  @nnx.jit
  def forward_and_grad(model, tokens, positions, segment_ids):
    def loss(model):
      logits = model(tokens, positions, segment_ids)
      return jnp.sum(jnp.where(real[..., None], logits * weights, 0.0)), logits
    (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return logits, grads

  def remats(model):  # blocks under jax.checkpoint in the traced train forward
    return str(jax.make_jaxpr(lambda t: model(t))(tokens)).count("remat2[")

  assert (remats(single), remats(sharded)) == (0, cfg.num_decoder_layers)
  got_single, grads_single = forward_and_grad(single, tokens, positions, segment_ids)
  got_sharded, grads_sharded = forward_and_grad(sharded, tokens, positions, segment_ids)
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(np.asarray(got_single)[real], want[real], atol=2e-5 * scale)
  np.testing.assert_allclose(np.asarray(got_sharded)[real], want[real], atol=2e-5 * scale)
  assert got_sharded.sharding.spec[0] == ("data", "fsdp")  # batch split over the mesh
  leaves_single = jax.tree.leaves(grads_single)
  leaves_sharded = jax.tree.leaves(grads_sharded)
  assert len(leaves_single) == len(leaves_sharded) == len(_params(single))
  for a, b in zip(leaves_single, leaves_sharded):
    a, b = np.asarray(a), np.asarray(b)
    assert np.all(np.isfinite(a)) and np.max(np.abs(a)) > 0
    np.testing.assert_allclose(b, a, atol=1e-5 * np.max(np.abs(a)))


def test_train_logits_equal_prefill_then_decode_on_the_mesh():
  cfg = load_config("tiny-lm", *MODEL, *MESH)
  mesh = create_mesh(cfg)
  model = Decoder(cfg, mesh=mesh, rngs=nnx.Rngs(1))
  shard_module(model, mesh, model.rules)
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, cfg.vocab_size, (BATCH, LENGTH)).astype(np.int32)
  want = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))  # [B, T, V], one causal row each
  prompt_lengths = np.array([5, 8, 3, 6])  # ragged prompts, right-padded to 8
  prompt = np.where(np.arange(8) < prompt_lengths[:, None], tokens[:, :8], 0)
  real = (np.arange(8) < prompt_lengths[:, None]).astype(np.int32)

  @jit_step(static_argnames="mode")
  def step(model, tokens, segment_ids, mode):
    return model(tokens, segment_ids=segment_ids, model_mode=mode)

  caches = model.init_cache(BATCH, LENGTH)
  assert len(caches) == cfg.num_decoder_layers and caches == model.caches()
  logits = np.asarray(step(model, prompt, real, "prefill"))  # [B, 8, V]
  got = [[logits[b, t] for t in range(prompt_lengths[b])] for b in range(BATCH)]
  for _ in range(LENGTH - 8):  # each row continues with its own next token
    nxt = np.array([tokens[b, len(got[b])] for b in range(BATCH)])[:, None]
    out = np.asarray(step(model, nxt, None, "autoregressive"))  # [B, 1, V]
    for b in range(BATCH):
      got[b].append(out[b, 0])
  scale = np.max(np.abs(want))
  for b in range(BATCH):
    n = len(got[b])
    np.testing.assert_allclose(np.stack(got[b]), want[b, :n], atol=2e-5 * scale,
                               err_msg=f"row {b}")


def test_bad_tokens_and_modes_raise_before_anything_runs():
  model = Decoder(load_config("tiny-lm", *MODEL), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="vocab_size=40"):
    model(np.array([[1, 40]]))
  with pytest.raises(ValueError, match="integer ids"):
    model(np.zeros((1, 2), np.float32))
  with pytest.raises(ValueError, match="model_mode"):
    model(np.zeros((1, 2), np.int32), model_mode="decode")


@pytest.mark.parametrize("preset,params_min,params_max", [("tiny-lm", 5e4, 2e5),
                                                          ("lm-1b", 1.0e9, 1.2e9)])
def test_presets_build(preset, params_min, params_max):
  cfg = load_config(preset)
  model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert params_min <= count <= params_max, count
  # Training FLOPs per token: 6 per weight of every matmul (all but the norm scales; the
  # tied embedding is the logits' matmul) plus attention's 12 * N * H per key seen.
  norms = (2 * cfg.num_decoder_layers + 1) * cfg.emb_dim
  pattern = cfg.attention_layer_pattern or (cfg.attention_type,)
  seen = sum(min(cfg.max_target_length / 2, cfg.sliding_window_size)
             if pattern[i % len(pattern)] == "local_sliding" else cfg.max_target_length / 2
             for i in range(cfg.num_decoder_layers))
  attention = 12 * cfg.num_query_heads * cfg.head_dim * seen
  assert model_flops_per_token(cfg) == pytest.approx(6 * (count - norms) + attention)
