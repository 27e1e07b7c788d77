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

from helpers.greedy import ENGINE_MODEL, greedy_reference, uncached_decode
from meshattn.configs import load_config
from meshattn.layers.decoder import Decoder
from meshattn.layers.engine import Engine, SamplingParams
from meshattn.layers.engine_schedule import Request, Scheduler
from meshattn.layers.engine_step import step_inputs
from meshattn.layers.sampling import sample

LOGITS = np.array([2.0, 1.5, 1.4, 0.3, -0.5, 1.0], np.float32)


def kept_distribution(logits, temperature, top_k, top_p):
  """float64 NumPy: probabilities after temperature, top-k (by value: ties with the k-th
  largest stay) and top-p (by rank, ties broken by lower id), 0 where dropped."""
  scaled = logits.astype(np.float64) / temperature
  order = np.argsort(-scaled, kind="stable")
  keep = np.ones(len(logits), bool)
  if top_k:
    keep = scaled >= scaled[order[min(top_k, len(logits)) - 1]]
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


TIES = np.array([3.0, 2.0, 2.0, 2.0, 0.5], np.float32)


@pytest.mark.parametrize("params, logits", [
    ((1.0, 0, 1.0), LOGITS), ((0.7, 4, 1.0), LOGITS), ((1.3, 0, 0.8), LOGITS),
    ((0.7, 4, 0.9), LOGITS), ((2.0, 3, 0.99), LOGITS),
    ((1.0, 2, 1.0), TIES),  # top-k by value: the three tied 2.0s all stay
    ((1.0, 0, 0.5), TIES),  # top-p by rank: 3.0 and the first 2.0 only
    ((1.0, 2, 0.6), TIES)])
def test_sample_matches_numpy_distribution(params, logits):
  want = kept_distribution(logits, *params)
  tokens = draws(params, logits=logits)
  freq = np.bincount(tokens, minlength=len(logits)) / len(tokens)
  assert set(np.flatnonzero(freq)) == set(np.flatnonzero(want))  # exactly the kept set
  noise = np.sqrt(want * (1 - want) / len(tokens))
  assert np.all(np.abs(freq - want) <= 4.5 * noise + 1e-9), (freq, want)


def test_greedy_cases():
  argmax = int(np.argmax(LOGITS))
  for params in [(0.0, 0, 1.0), (0.0, 2, 0.5), (1.0, 1, 1.0), (5.0, 0, 1e-6)]:
    assert set(draws(params, n=64)) == {argmax}, params
  tie = np.array([1.0, 3.0, 3.0, 0.0], np.float32)  # greedy takes the first maximum
  assert set(draws((0.0, 0, 1.0), n=8, logits=tie)) == {1}
  # A tiny temperature is near-greedy: dividing before shifting by the max overflowed to
  # inf, and the softmax of several infs drew the first of them (token 0 here).
  big = np.array([40.0, 50.0, 1.0, -1.0], np.float32)
  for temperature in (1e-37, 1e-30, 1e-6):
    assert set(draws((temperature, 0, 1.0), n=64, logits=big)) == {1}, temperature


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, "temperature must be a finite number >= 0"),
    ("temperature", float("nan"), "temperature must be a finite number >= 0"),
    ("top_k", 2.5, r"top_k must be an integer in \[0, 2\*\*31\)"),
    ("top_k", -1, r"top_k must be an integer in \[0, 2\*\*31\)"),
    ("top_k", 2**40, r"top_k must be an integer in \[0, 2\*\*31\)"),  # travels as int32
    ("top_p", 0.0, r"top_p must be a number in \(0, 1\]"),
    ("top_p", 1.5, r"top_p must be a number in \(0, 1\]"),
    ("seed", -3, r"seed must be an integer in \[0, 2\*\*32\)"),
    ("seed", 1.0, r"seed must be an integer in \[0, 2\*\*32\)")])
def test_bad_params_are_named(field, value, message):
  with pytest.raises(ValueError, match=f"SamplingParams: {message}"):
    SamplingParams(**{field: value})


OVERRIDES = ENGINE_MODEL
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
  engine = Engine(model, num_slots=2, chunk_size=4)
  with pytest.raises(ValueError, match="sampling must be a SamplingParams"):
    engine.submit(prompts[0], 2, sampling={"temperature": 1})
  forced = SamplingParams(temperature=1.0, seed=1)
  object.__setattr__(forced, "top_k", 2**40)  # past the dataclass's own check
  with pytest.raises(ValueError, match=r"request 0: sampling: top_k must be an integer"):
    engine.submit(prompts[0], 2, sampling=forced)
  assert engine.idle and engine.step() == []  # nothing queued: the engine still serves
  engine.submit(prompts[0], 2, sampling=SAMPLING[0])
  while not engine.idle:
    engine.step()
  assert engine.results()[0].tokens == want[0][:2]  # the refused requests took no id


def test_only_a_prompts_last_chunk_samples():
  """A chunk that does not end its prompt drops its token, so its row stays greedy: a step
  whose only sampled request is mid-prompt runs the argmax variant (no vocabulary sort)."""
  scheduler = Scheduler(num_slots=2, max_length=32, num_pages=16, tokens_per_page=4,
                        chunk_size=4, prefill_rows=1, end_token=None, vocab_size=40)
  scheduler.submit(Request(0, np.arange(1, 10, dtype=np.int32), 3, 0.0,
                           SamplingParams(temperature=1.0, seed=5)))
  seen = []
  for _ in range(3):  # chunks of 4, 4 and 1 prompt tokens
    scheduler.admit()
    plan = scheduler.plan()
    inputs = step_inputs(plan, 2, 1, 4)
    seen.append((plan.chunks[0].last, inputs.sampled, float(inputs.temperature[2])))
    scheduler.commit(plan, np.zeros((3,), np.int32))
  assert seen == [(False, False, 0.0), (False, False, 0.0), (True, True, 1.0)]
