"""Sampling in the serving engine (layers/sampling.py).

`sample` against a float64 NumPy form of temperature -> top-k -> top-p (the kept set
exactly, the frequencies within binomial noise); greedy where it must be; each bad
SamplingParams field named. Through the engine: a mix of greedy and sampled requests
equals an uncached decode that samples each token with the request's key for that
position, and the tokens do not depend on the schedule (slots, chunk size, arrival order).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers.greedy import greedy_reference, uncached_decode
from meshattn.configs import load_config
from meshattn.layers.decoder import Decoder
from meshattn.layers.engine import Engine, SamplingParams
from meshattn.layers.sampling import sample

LOGITS = np.array([2.0, 1.5, 1.4, 0.3, -0.5, 1.0], np.float32)


def kept_distribution(logits, temperature, top_k, top_p):
  """float64 NumPy: probabilities after temperature, top-k and top-p (0 where dropped)."""
  scaled = logits.astype(np.float64) / temperature
  order = np.argsort(-scaled, kind="stable")
  keep = np.zeros(len(logits), bool)
  keep[order[:top_k or len(logits)]] = True
  probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
  probs /= probs.sum()
  mass_before = np.cumsum(probs[order]) - probs[order]
  nucleus = order[(mass_before < top_p) & keep[order]]
  final = np.zeros(len(logits))
  final[nucleus] = probs[nucleus]
  return final / final.sum()


def draws(params, n=4000, logits=LOGITS):
  rows = lambda x, dtype: jnp.full((n,), x, dtype)  # noqa: E731
  return np.asarray(jax.jit(sample)(
      jnp.broadcast_to(jnp.asarray(logits), (n, len(logits))), rows(params[0], jnp.float32),
      rows(params[1], jnp.int32), rows(params[2], jnp.float32), rows(7, jnp.uint32),
      jnp.arange(n, dtype=jnp.int32)))  # a key per position


@pytest.mark.parametrize("params", [(1.0, 0, 1.0), (0.7, 4, 1.0), (1.3, 0, 0.8), (0.7, 4, 0.9),
                                    (2.0, 3, 0.99)])
def test_sample_matches_numpy_distribution(params):
  want = kept_distribution(LOGITS, *params)
  tokens = draws(params)
  freq = np.bincount(tokens, minlength=len(LOGITS)) / len(tokens)
  assert set(np.flatnonzero(freq)) == set(np.flatnonzero(want))  # exactly the kept set
  noise = np.sqrt(want * (1 - want) / len(tokens))
  assert np.all(np.abs(freq - want) <= 4.5 * noise + 1e-9), (freq, want)


def test_greedy_cases():
  argmax = int(np.argmax(LOGITS))
  for params in [(0.0, 0, 1.0), (0.0, 2, 0.5), (1.0, 1, 1.0), (5.0, 0, 1e-6)]:
    assert set(draws(params, n=64)) == {argmax}, params
  tie = np.array([1.0, 3.0, 3.0, 0.0], np.float32)  # greedy takes the first maximum
  assert set(draws((0.0, 0, 1.0), n=8, logits=tie)) == {1}


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, "temperature must be a finite number >= 0"),
    ("temperature", float("nan"), "temperature must be a finite number >= 0"),
    ("top_k", 2.5, "top_k must be an integer >= 0"),
    ("top_k", -1, "top_k must be an integer >= 0"),
    ("top_p", 0.0, r"top_p must be a number in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be a number in \(0, 1\]"),
    ("seed", -3, r"seed must be an integer in \[0, 2\*\*32\)"),
    ("seed", 1.0, r"seed must be an integer in \[0, 2\*\*32\)")])
def test_bad_params_are_named(field, value, message):
  with pytest.raises(ValueError, match=f"SamplingParams: {message}"):
    SamplingParams(**{field: value})


OVERRIDES = ("emb_dim=32", "mlp_dim=64", "num_query_heads=4", "num_kv_heads=2", "head_dim=8",
             "num_decoder_layers=2", "vocab_size=40", "max_target_length=32",
             "max_prefill_predict_length=32", "paged_kv_cache=true", "tokens_per_page=4",
             "num_pages=24")
PROMPTS = [9, 3, 12, 5]
MAX_NEW = [6, 5, 4, 6]
SAMPLING = [SamplingParams(temperature=1.5, seed=11), SamplingParams(),  # greedy
            SamplingParams(temperature=0.9, top_k=5, top_p=0.9, seed=3),
            SamplingParams(temperature=2.0, top_p=0.95)]  # seed None: the request id


def sampled_reference(model, prompt, max_new, params):
  """Uncached: the train forward over the growing sequence, each token sampled with the
  request's key for its position."""
  def pick(logits, position):
    return sample(logits[None], jnp.asarray([params.temperature], jnp.float32),
                  jnp.asarray([params.top_k], jnp.int32), jnp.asarray([params.top_p], jnp.float32),
                  jnp.asarray([params.seed], jnp.uint32), jnp.asarray([position], jnp.int32))[0]
  return uncached_decode(model, prompt, max_new, pick)


def serve(model, prompts, *, num_slots, chunk_size, order):
  engine = Engine(model, num_slots=num_slots, chunk_size=chunk_size)
  for rid in order:
    engine.submit(prompts[rid], MAX_NEW[rid], id=rid, sampling=SAMPLING[rid])
  while not engine.idle:
    engine.step()
  return {rid: r.tokens for rid, r in engine.results().items()}


def test_engine_sampling_is_the_requests_own_and_schedule_free():
  cfg = load_config("tiny-lm", *OVERRIDES, num_devices=1)
  model = Decoder(cfg, rngs=nnx.Rngs(2))
  rng = np.random.default_rng(4)
  prompts = [rng.integers(1, cfg.vocab_size, n).astype(np.int32) for n in PROMPTS]
  seeds = [p.seed if p.seed is not None else rid for rid, p in enumerate(SAMPLING)]
  want = [sampled_reference(model, prompts[r], MAX_NEW[r],
                            SamplingParams(SAMPLING[r].temperature, SAMPLING[r].top_k,
                                           SAMPLING[r].top_p, seeds[r]))
          for r in range(len(PROMPTS))]
  first = serve(model, prompts, num_slots=2, chunk_size=4, order=[0, 1, 2, 3])
  second = serve(model, prompts, num_slots=3, chunk_size=5, order=[3, 2, 1, 0])
  for rid in range(len(PROMPTS)):
    assert first[rid] == want[rid], (rid, first[rid], want[rid])
    assert second[rid] == want[rid], (rid, second[rid], want[rid])
  # The sampled requests did sample: some token differs from the greedy decode's.
  greedy = [greedy_reference(model, prompts[r], MAX_NEW[r]) for r in (0, 2, 3)]
  assert any(g != want[r] for g, r in zip(greedy, (0, 2, 3)))
  assert want[1] == greedy_reference(model, prompts[1], MAX_NEW[1])
  with pytest.raises(ValueError, match="sampling must be a SamplingParams"):
    Engine(model, num_slots=2, chunk_size=4).submit(prompts[0], 2, sampling={"temperature": 1})
