"""The engine's host scheduler (no JAX): admission by worst-case pages, chunk plans,
lazy page growth, finishing on length / end token, slot reuse."""

import numpy as np
import pytest

from meshattn.layers.engine_schedule import Request, Scheduler


def scheduler(**kw):
  args = dict(num_slots=2, max_length=32, num_pages=6, tokens_per_page=4, chunk_size=5,
              prefill_rows=1)
  return Scheduler(**dict(args, **kw))


def request(rid, prompt_len, max_new):
  return Request(rid, np.arange(1, prompt_len + 1, dtype=np.int32), max_new)


def run_step(s, token=7):
  """Admit, plan, commit with `token` sampled in every row."""
  s.admit()
  plan = s.plan()
  return plan, s.commit(plan, np.full(s.num_slots + s.prefill_rows, token))


def test_chunks_then_decode_with_positions_and_pages():
  s = scheduler()
  s.submit(request(0, 12, 3))  # 12 prompt tokens: chunks of 5, 5, 2; then 2 decode steps
  plans = []
  while not s.idle:
    s.admit()
    plan = s.plan()
    plans.append((plan, s.pages_reserved(), s.pages_filled()))
    s.commit(plan, np.full(3, 7))
  starts = [[(c.start, len(c.tokens), c.last) for c in p.chunks] for p, _, _ in plans]
  assert starts == [[(0, 5, False)], [(5, 5, False)], [(10, 2, True)], [], []]
  assert [p.decode_positions for p, _, _ in plans] == [(), (), (), (12,), (13,)]
  assert [p.lengths_after for p, _, _ in plans] == [{0: 5}, {0: 10}, {0: 12}, {0: 13}, {0: 14}]
  # worst case 12 + 3 - 1 = 14 tokens: 4 pages reserved throughout; filled as tokens arrive
  assert [r for _, r, _ in plans] == [4] * 5
  assert [f for _, _, f in plans] == [2, 3, 3, 4, 4]
  assert s.committed_pages == 0 and s.pages_filled() == 0
  assert s.running == {}


def test_planning_a_step_ahead_feeds_tokens_from_the_device_and_drops_rows_after_end():
  """Plans n+1 before n's tokens are back (the engine's overlap): decode rows then name the
  previous step's output row; a request that ended on end_token in n has its row of n+1
  dropped at commit."""
  s = scheduler(num_slots=2, prefill_rows=1, end_token=9)
  s.submit(request(0, 3, 4))
  s.admit()
  first = s.plan()  # the whole prompt: row 2 (= S + 0) samples token 0
  second = s.plan()  # decode, its token is row 2 of `first`, not back yet
  assert second.decode_slots == (0,) and second.decode_sources == (2,)
  assert second.decode_positions == (3,)
  assert s.commit(first, np.array([0, 0, 5])) == []
  third = s.plan()  # token 1 comes from `second`'s row for slot 0
  assert third.decode_sources == (0,) and third.decode_positions == (4,)
  finished = s.commit(second, np.array([9, 0, 0]))  # end token
  assert [q.output for q in finished] == [[5, 9]] and finished[0].finish_reason == "end_token"
  assert s.commit(third, np.array([4, 0, 0])) == []  # the extra row is dropped
  assert finished[0].output == [5, 9] and s.idle and s.committed_pages == 0
  s.submit(request(1, 1, 2))
  s.admit()
  plan = s.plan()
  s.commit(plan, np.array([0, 0, 6]))
  nxt = s.plan()  # everything back: the token comes from the host
  assert nxt.decode_sources == (-1,) and nxt.decode_tokens == (6,)


def test_output_and_finish_reason():
  s = scheduler()
  s.submit(request(0, 2, 3))
  finished = []
  while not s.idle:
    finished += run_step(s)[1]
  assert finished[0].output == [7, 7, 7] and finished[0].finish_reason == "length"


def test_admission_waits_for_worst_case_pages_and_reuses_slots():
  s = scheduler(num_slots=3)
  s.submit(request(0, 8, 9))  # 16 tokens worst case: 4 pages of 6
  s.submit(request(1, 4, 5))  # 8 tokens: 2 pages -> fits (6)
  s.submit(request(2, 2, 2))  # 3 tokens: 1 page -> waits although a slot is free
  admitted = s.admit()
  assert [q.request.id for q in admitted] == [0, 1] and len(s.waiting) == 1
  finished_ids = []
  while 2 not in {q.request.id for q in s.running.values()}:
    assert s.waiting, "request 2 was never admitted"
    finished_ids += [q.request.id for q in run_step(s)[1]]
  # request 1 finished first (slot 1, 2 pages back) and request 2 took that slot
  assert finished_ids == [1] and s.running[1].request.id == 2
  assert s.committed_pages == 4 + 1


def test_end_token_stops_and_two_prefill_rows():
  s = scheduler(prefill_rows=2, end_token=7, num_pages=8)
  s.submit(request(0, 3, 10))
  s.submit(request(1, 4, 10))
  plan, finished = run_step(s, token=7)
  assert [c.slot for c in plan.chunks] == [0, 1]
  assert sorted(q.finish_reason for q in finished) == ["end_token", "end_token"]
  assert s.idle and s.pages_reserved() == 0


@pytest.mark.parametrize("bad, message", [
    (Request(0, np.zeros((0,), np.int32), 2), "non-empty"),
    (Request(0, np.ones((4,), np.float32), 2), "integer"),
    (Request(0, np.ones((4,), np.int32), 0), "max_new_tokens"),
    (Request(0, np.ones((30,), np.int32), 4), "max_length"),
])
def test_bad_requests_are_refused_naming_the_field(bad, message):
  s = scheduler()
  with pytest.raises(ValueError, match=message):
    s.submit(bad)
  assert s.idle


def test_request_larger_than_the_pool_is_refused():
  with pytest.raises(ValueError, match="num_pages"):
    scheduler(num_pages=2).submit(request(0, 8, 4))
