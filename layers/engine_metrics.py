"""What the serving engine measures: per request and per step, summarised and plotted.

Times are seconds on the engine's clock, from the start of a run (Engine.run
restarts it when it starts and when it returns); each record keeps that
start, `clock_start` (seconds since the engine was built), so that records of
several runs lie on one timeline. A token's time is when its step's result
reached the host.

- time to first token (TTFT): first token time - arrival (queueing included);
- time per output token (TPOT): (last token time - first token time) /
  (output tokens - 1), for requests with at least two output tokens;
- throughput: output tokens / (last finish - first arrival) of a run; over
  several runs (several clocks), the union of the runs' such spans: the time
  between runs is not counted, nor twice a stretch two runs share (a request
  submitted before a run and finished in it);
  decode-only steps' tokens / their periods (read-back to read-back: the
  loop's rate);
- per step: decode rows, chunk rows, tokens, running and waiting requests,
  cache pages reserved (each running request's worst case) and filled
  (holding its cached tokens), the same in every layer.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class RequestResult:
  """A finished request: its output tokens and timings (engine clock, seconds)."""
  id: int
  prompt: np.ndarray
  tokens: list[int]
  finish_reason: str  # "length" or "end_token"
  arrival: float
  first_token_time: float
  finish_time: float
  clock_start: float = 0.0  # when the times' clock read 0, seconds since the engine was built

  @property
  def ttft(self) -> float:
    return self.first_token_time - self.arrival

  @property
  def tpot(self) -> float | None:
    n = len(self.tokens)
    return (self.finish_time - self.first_token_time) / (n - 1) if n > 1 else None


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """One engine step; counts are those during the step (before finished requests leave)."""
  start: float  # when the step was dispatched (its page reservations just before)
  time: float  # when the step's tokens reached the host
  kind: str  # decode / chunk / mixed
  decode_rows: int
  chunk_rows: int
  tokens: int  # decode tokens + real chunk tokens
  running: int  # requests holding a slot during the step
  waiting: int  # requests queued for a slot or pages
  pages_reserved: int  # pages the running requests hold (their worst case)
  pages_filled: int  # of those, pages holding cached tokens
  idle_after: bool  # nothing running or waiting once the step's finished requests left
  clock_start: float = 0.0  # when start / time's clock read 0, s since the engine was built


def percentile(values, q: float) -> float:
  values = [v for v in values if v is not None]
  return float(np.percentile(values, q)) if values else float("nan")


def summarize(results: list[RequestResult], steps: list[StepRecord]) -> dict:
  """Throughput, TTFT / TPOT p50 and p90, pages and occupancy of one run or several."""
  if not results:
    return {"requests": 0}
  # One span per clock (a run, or the steps between runs): last finish - first arrival;
  # their union, since a request submitted before a run finishes in it.
  runs: dict[float, list[RequestResult]] = {}
  for r in results:
    runs.setdefault(r.clock_start, []).append(r)
  seconds = covered_seconds([(c + min(r.arrival for r in rs), c + max(r.finish_time for r in rs))
                             for c, rs in runs.items()])
  output_tokens = sum(len(r.tokens) for r in results)
  ttft = [r.ttft for r in results]
  # A step's period: from the previous read-back (or its dispatch, after an idle gap) to its
  # own; with overlap, steps run while the host handles the one before, so dispatch-to-read
  # times overlap and would add up to more than the run. On the one timeline (clock_start):
  # each run restarts its records' clock.
  done = [s.clock_start + s.time for s in steps]
  periods = [done[i] - max(s.clock_start + s.start, done[i - 1] if i else -np.inf)
             for i, s in enumerate(steps)]
  decode = [(s, p) for s, p in zip(steps, periods) if s.kind == "decode"]
  decode_s = sum(p for _, p in decode)
  tpot = [r.tpot for r in results]
  return {
      "requests": len(results),
      "output_tokens": output_tokens,
      "prompt_tokens": int(sum(len(r.prompt) for r in results)),
      "seconds": seconds,
      "tokens_per_s": output_tokens / max(seconds, 1e-9),
      "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
      "tpot_p50_s": percentile(tpot, 50), "tpot_p90_s": percentile(tpot, 90),
      # decode-only steps: their rows over their periods (what the loop pays per step)
      "decode_tokens_per_s": sum(s.decode_rows for s, _ in decode) / decode_s if decode_s else 0.0,
      "decode_step_s": decode_s / len(decode) if decode else float("nan"),
      "steps": len(steps),
      "mixed_steps": sum(s.kind == "mixed" for s in steps),
      "max_pages_reserved": max((s.pages_reserved for s in steps), default=0),
      "max_pages_filled": max((s.pages_filled for s in steps), default=0),
      "mean_running": float(np.mean([s.running for s in steps])) if steps else 0.0,
  }


def covered_seconds(spans) -> float:
  """Length of the union of (start, end) intervals: time covered by at least one."""
  total, reach = 0.0, -np.inf
  for start, end in sorted(spans):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return float(total)


def plot_timeline(steps: list[StepRecord], path: str, *, num_slots: int, num_pages: int,
                  title: str = "") -> None:
  """PNG: running requests (batch occupancy) and cache pages (reserved, filled) over time."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
  for name, label in (("running", "running (slots held)"), ("decode_rows", "decode rows"),
                      ("waiting", "waiting")):
    top.plot(*_segments(steps, name), label=label, alpha=0.6 if name == "waiting" else 1.0)
  top.axhline(num_slots, color="gray", linestyle=":", label=f"slots ({num_slots})")
  top.set_ylabel("requests")
  top.legend(loc="upper right", fontsize=7)
  bottom.plot(*_segments(steps, "pages_reserved"), color="tab:green", label="reserved")
  bottom.plot(*_segments(steps, "pages_filled"), color="tab:olive", label="holding tokens")
  bottom.axhline(num_pages, color="gray", linestyle=":", label=f"pool ({num_pages})")
  bottom.set_ylabel("cache pages in use")
  bottom.set_xlabel("seconds (from the first run's start)")
  bottom.legend(loc="upper right", fontsize=7)
  if title:
    top.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _segments(steps: list[StepRecord], field: str) -> tuple[list[float], list[float]]:
  """A step plot of `field`: its value from each step's start to the next one's, or 0
  from the step's end when it left the engine idle (waiting for arrivals) or the next step
  belongs to another run. One timeline: seconds from the first step's clock start (each run
  restarts its records' clock, so several runs would otherwise be drawn over each other)."""
  xs, ys = [], []
  origin = steps[0].clock_start if steps else 0.0
  on_line = lambda step, t: step.clock_start - origin + t  # noqa: E731
  for i, step in enumerate(steps):
    value = getattr(step, field)
    start, done = on_line(step, step.start), on_line(step, step.time)
    nxt = steps[i + 1] if i + 1 < len(steps) else None
    if nxt is None or nxt.clock_start != step.clock_start or step.idle_after:
      end = done if nxt is None else on_line(nxt, nxt.start)
      xs += [start, done, done, end]
      ys += [value, value, 0, 0]
    else:
      xs += [start, on_line(nxt, nxt.start)]
      ys += [value, value]
  return xs, ys
