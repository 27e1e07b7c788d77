"""The serving tests' reference: a plain uncached decode through the train forward."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

# The serving tests' model: tiny-lm at 2 layers of width 32, a paged cache of 24 pages of 4.
ENGINE_MODEL = ("emb_dim=32", "mlp_dim=64", "num_query_heads=4", "num_kv_heads=2",
                "head_dim=8", "num_decoder_layers=2", "vocab_size=40", "max_target_length=32",
                "max_prefill_predict_length=32", "paged_kv_cache=true", "tokens_per_page=4",
                "num_pages=24")
# Their 8-device mesh (data x fsdp x tensor).
ENGINE_MESH = ("ici_data_parallelism=2", "ici_fsdp_parallelism=2", "ici_tensor_parallelism=2")


def uncached_decode(model, prompt, max_new, pick, width=32):
  """The whole sequence through the train forward for each token; pick(logits [V],
  position) gives the token that takes `position`. Right padding to one width (segment 0)
  keeps it one compile; causal, so it changes nothing."""
  forward = nnx.jit(lambda m, t, s: m(t, segment_ids=s, model_mode="train"))
  sequence = list(prompt)
  for _ in range(max_new):
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(sequence)] = sequence
    segments = (np.arange(width) < len(sequence)).astype(np.int32)[None]
    logits = forward(model, jnp.asarray(tokens), jnp.asarray(segments))  # [1, W, V]
    sequence.append(int(pick(logits[0, len(sequence) - 1], len(sequence))))
  return sequence[len(prompt):]


def greedy_reference(model, prompt, max_new, width=32):
  """Uncached greedy decode (argmax, first maximum)."""
  return uncached_decode(model, prompt, max_new, lambda logits, _: jnp.argmax(logits), width)


def build_decoder(overrides, *, sharded: bool, mesh_overrides=(), seed: int = 3):
  """(config, Decoder) of tiny-lm with `overrides`; sharded: on the mesh of
  `mesh_overrides` with parameters placed by the rules (the same values as unsharded)."""
  from meshattn.configs import load_config
  from meshattn.layers.decoder import Decoder
  from meshattn.sharding import create_mesh, shard_module
  cfg = load_config("tiny-lm", *overrides, *(mesh_overrides if sharded else ()))
  mesh = create_mesh(cfg) if sharded else None
  model = Decoder(cfg, mesh=mesh, rngs=nnx.Rngs(seed))
  if sharded:
    shard_module(model, mesh, model.rules)
  return cfg, model


def greedy_case(overrides, mesh_overrides, lengths, max_new, *, seed: int, prompt_seed: int):
  """The engine tests' setup: (config, unsharded reference, the same model sharded,
  prompts of `lengths`, each prompt's uncached greedy decode of max_new[i] tokens)."""
  cfg, reference = build_decoder(overrides, sharded=False, seed=seed)
  rng = np.random.default_rng(prompt_seed)
  prompts = [rng.integers(1, cfg.vocab_size, n).astype(np.int32) for n in lengths]
  want = [greedy_reference(reference, p, m) for p, m in zip(prompts, max_new)]
  _, model = build_decoder(overrides, sharded=True, mesh_overrides=mesh_overrides, seed=seed)
  return cfg, reference, model, prompts, want
