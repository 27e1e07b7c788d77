"""The engine's timeline plot draws several runs one after another, never over each other."""

import numpy as np

from meshattn.layers.engine_metrics import StepRecord, _segments, plot_timeline


def _step(start, time, clock_start, running, idle_after=False):
  return StepRecord(start=start, time=time, kind="decode", decode_rows=running, chunk_rows=0,
                    tokens=running, running=running, waiting=0, pages_reserved=running,
                    pages_filled=running, idle_after=idle_after, clock_start=clock_start)


def _value_at(xs, ys, t):
  """The step plot's value at time t: the last point at or before t."""
  return ys[max(i for i, x in enumerate(xs) if x <= t)]


def test_two_runs_are_drawn_on_one_timeline(tmp_path):
  # Each run restarts its records' clock at 0; the second run started 10 s after the first.
  steps = [_step(0.0, 1.0, 0.0, 2), _step(1.0, 2.0, 0.0, 1, idle_after=True),
           _step(0.0, 1.0, 10.0, 3), _step(1.0, 2.0, 10.0, 3)]
  xs, ys = _segments(steps, "running")
  assert np.all(np.diff(xs) >= 0), xs  # time only moves forward
  assert xs[0] == 0.0 and xs[-1] == 12.0  # the second run ends 12 s after the first began
  assert _value_at(xs, ys, 5.0) == 0  # between the runs (2 s .. 10 s) nothing runs
  assert _value_at(xs, ys, 0.5) == 2 and _value_at(xs, ys, 10.5) == 3
  # a step followed by another run's step drops to 0 at its end, even if not marked idle
  steps[1] = _step(1.0, 2.0, 0.0, 1, idle_after=False)
  xs, ys = _segments(steps, "running")
  assert np.all(np.diff(xs) >= 0) and _value_at(xs, ys, 5.0) == 0
  plot_timeline(steps, str(tmp_path / "t.png"), num_slots=4, num_pages=8)
  assert (tmp_path / "t.png").stat().st_size > 0
