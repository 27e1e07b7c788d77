"""Engine.submit refuses requests the model cannot serve; summary() adds runs up.

Inside the compiled step the decoder cannot check its token ids (an id past the
vocabulary reads a NaN embedding row and decodes junk), so submit checks them,
with the decoder's wording, before anything is queued; a float max_new_tokens
was truncated. Each run restarts the engine's clock, so the summary's seconds
must add the runs up (on one timeline), not take the span of their overlapping
times.
"""

import numpy as np
import pytest
from flax import nnx

from helpers.greedy import ENGINE_MODEL
from meshattn.configs import load_config
from meshattn.layers.decoder import Decoder
from meshattn.layers.engine import Engine
from meshattn.layers.engine_schedule import Request

OVERRIDES = ENGINE_MODEL


class TickClock:
  """A clock that moves one second each time it is read: times without sleeping."""

  def __init__(self):
    self.t = 0.0

  def __call__(self) -> float:
    self.t += 1.0
    return self.t


def engine(**kw) -> Engine:
  model = Decoder(load_config("tiny-lm", *OVERRIDES), rngs=nnx.Rngs(3))
  # one compiled kind (mixed): the tests are about the host side
  return Engine(model, num_slots=2, chunk_size=8, specialize=False, **kw)


IDS = r"prompt tokens must be ids in \[0, vocab_size=40\)"
COUNT = r"max_new_tokens must be an integer >= 1"


@pytest.mark.parametrize("prompt, max_new_tokens, message", [
    ([5, 17, 1000, 3], 4, IDS),  # the decoder's own message: "tokens must be ids in [0, ...)"
    ([5, 40], 4, IDS),
    ([-1, 3], 4, IDS),
    (np.array([2**63, 1], np.uint64), 4, IDS),  # not wrapped to a negative int64
    ([1.0, 2.0], 4, "integer token ids"),
    ([True, False], 4, "integer token ids"),
    ([5, 6], 2.9, COUNT),  # was truncated to 2
    ([5, 6], 2.0, COUNT),
    ([5, 6], np.float32(3), COUNT),
    ([5, 6], True, COUNT),  # a bool is an int subclass, not a count
    ([5, 6], "3", COUNT),
    ([5, 6], 0, COUNT),
    ([5, 6], -2, COUNT),
])
def test_submit_refuses_what_the_model_cannot_serve_before_any_change(prompt, max_new_tokens,
                                                                      message):
  e = engine()
  with pytest.raises(ValueError, match=message):
    e.submit(prompt, max_new_tokens=max_new_tokens)
  assert e.idle and not e.scheduler.waiting and not e.results()
  assert e.submit([5, 39], max_new_tokens=np.int64(2)) == 0  # the id was not used up


def test_summary_adds_runs_up_on_one_timeline():
  clock = TickClock()
  e = engine(clock=clock)
  # a stretch of submit / step: `a` finishes in it, `b` only in the run after it
  a = e.submit(np.array([5, 17, 3], np.int32), max_new_tokens=2)
  b = e.submit(np.array([9, 2, 30], np.int32), max_new_tokens=12)
  while a not in e.results():
    e.step()
  assert b not in e.results()
  def trace(first):  # two requests of 3 tokens, ids first, first + 1
    return [Request(first + i, np.array([3, 1, 4][:i + 2], np.int32), 3) for i in range(2)]

  run1 = e.run(trace(10), realtime=False)
  run2 = e.run(trace(20), realtime=False)
  results = e.results()
  assert set(results) == {a, b, 10, 11, 20, 21}
  assert all(r.ttft > 0 for r in results.values())  # b's arrival is on the run's clock too
  first = results[a]
  assert results[b].clock_start == run1[10].clock_start > first.clock_start  # b: run 1's clock
  # Each run: last finish - first arrival (0 with realtime=False). The stretch before run 1
  # overlaps it (b was waiting in both): that time is counted once.
  end1 = run1[10].clock_start + max(r.finish_time for r in (*run1.values(), results[b]))
  want = (end1 - (first.clock_start + first.arrival)) + max(r.finish_time for r in run2.values())
  summary = e.summary()
  assert summary["seconds"] == pytest.approx(want)
  assert summary["output_tokens"] == 2 + 12 + 4 * 3
  assert summary["tokens_per_s"] == pytest.approx(summary["output_tokens"] / want)
  assert summary["decode_step_s"] > 0


@pytest.mark.parametrize("bad_id", [2.9, "3", True])
def test_a_request_id_must_be_an_int(bad_id):
  e = engine()
  with pytest.raises(ValueError, match=r"Engine.submit: id must be an int"):
    e.submit([1, 2], 2, id=bad_id)
  assert e.submit([1, 2], 2, id=np.int64(3)) == 3  # an integer id, NumPy's too


@pytest.mark.parametrize("arrival", [float("nan"), float("inf"), "0.5", True, 1e9])
def test_arrival_must_be_finite_and_not_after_now(arrival):
  e = engine()
  with pytest.raises(ValueError, match=r"arrival"):
    e.submit([1, 2], 2, arrival=arrival)
  assert e.idle and not e.scheduler.waiting
  assert e.submit([1, 2], 2, arrival=e.now() - 1.0) == 0  # arrived a second ago: fine


def test_run_checks_the_whole_trace_before_queueing_anything():
  e = engine()
  good = Request(1, np.array([5, 17], np.int32), 2)
  bad = Request(2, np.array([5, 1000], np.int32), 2)  # an id outside vocab_size=40
  with pytest.raises(ValueError, match=r"request 2: prompt tokens must be ids"):
    e.run([good, bad], realtime=False)
  with pytest.raises(ValueError, match=r"request ids must be unique, \[1\]"):
    e.run([good, good], realtime=False)
  assert e.idle and not e.scheduler.waiting and not e.results()
  fixed = e.run([good, Request(2, np.array([5, 10], np.int32), 2)], realtime=False)
  assert set(fixed) == {1, 2}  # the ids were not used up by the failed runs
