"""The sweeps' time box (scripts/tune_common.py): each group gets an equal share of what is
left, dropped groups give theirs to the rest, and a group's first candidate always runs."""

import time

from meshattn.scripts.tune_common import TimeBox, past_share


def test_time_box_shares_what_is_left():
  start = time.perf_counter()
  box = TimeBox(100.0, 4)
  box.drop(2)  # two groups' problems could not be built: the other two share 100 s
  first = box.next_share() - start
  assert 49.0 < first <= 50.5
  assert box.next_share() - start > 99.0  # the last group gets all that is left
  assert not past_share(0, start) and past_share(1, start) and not past_share(1, start + 60)


def test_an_empty_budget_still_runs_each_groups_first_candidate():
  box = TimeBox(0.0, 2)
  end = box.next_share()
  assert not past_share(0, end) and past_share(1, end)
