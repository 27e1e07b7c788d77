"""What the serving engine measures: per request and per step, summarised and plotted.

Times are seconds on the engine's clock, from the start of a run. A token's
time is when its step's result reached the host.

- time to first token (TTFT): first token time - arrival (queueing included);
- time per output token (TPOT): (last token time - first token time) /
  (output tokens - 1), for requests with at least two output tokens;
- throughput: output tokens / (last finish - first arrival);
- per step: decode rows, chunk rows, tokens, running and waiting requests,
  cache pages in use (what the scheduler reserved, the same in every layer).
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

  @property
  def ttft(self) -> float:
    return self.first_token_time - self.arrival

  @property
  def tpot(self) -> float | None:
    n = len(self.tokens)
    return (self.finish_time - self.first_token_time) / (n - 1) if n > 1 else None


@dataclasses.dataclass(frozen=True)
class StepRecord:
  time: float  # when the step's tokens reached the host
  seconds: float  # the step's wall time, dispatch to tokens on the host
  kind: str  # decode / chunk / mixed
  decode_rows: int
  chunk_rows: int
  tokens: int  # decode tokens + real chunk tokens
  running: int  # requests holding a slot during the step
  waiting: int  # requests queued for a slot or pages
  pages_in_use: int


def percentile(values, q: float) -> float:
  values = [v for v in values if v is not None]
  return float(np.percentile(values, q)) if values else float("nan")


def summarize(results: list[RequestResult], steps: list[StepRecord]) -> dict:
  """Throughput, TTFT / TPOT p50 and p90, pages and occupancy of a run."""
  if not results:
    return {"requests": 0}
  start = min(r.arrival for r in results)
  end = max(r.finish_time for r in results)
  output_tokens = sum(len(r.tokens) for r in results)
  ttft = [r.ttft for r in results]
  tpot = [r.tpot for r in results]
  return {
      "requests": len(results),
      "output_tokens": output_tokens,
      "prompt_tokens": int(sum(len(r.prompt) for r in results)),
      "seconds": end - start,
      "tokens_per_s": output_tokens / max(end - start, 1e-9),
      "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
      "tpot_p50_s": percentile(tpot, 50), "tpot_p90_s": percentile(tpot, 90),
      "steps": len(steps),
      "mixed_steps": sum(s.kind == "mixed" for s in steps),
      "max_pages_in_use": max((s.pages_in_use for s in steps), default=0),
      "mean_running": float(np.mean([s.running for s in steps])) if steps else 0.0,
  }


def plot_timeline(steps: list[StepRecord], path: str, *, num_slots: int, num_pages: int,
                  title: str = "") -> None:
  """PNG: running requests (batch occupancy) and cache pages in use over time."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  times = [s.time for s in steps]
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
  top.step(times, [s.running for s in steps], where="post", label="running (slots held)")
  top.step(times, [s.decode_rows for s in steps], where="post", label="decode rows")
  top.step(times, [s.waiting for s in steps], where="post", label="waiting", alpha=0.6)
  top.axhline(num_slots, color="gray", linestyle=":", label=f"slots ({num_slots})")
  top.set_ylabel("requests")
  top.legend(loc="upper right", fontsize=7)
  bottom.step(times, [s.pages_in_use for s in steps], where="post", color="tab:green")
  bottom.axhline(num_pages, color="gray", linestyle=":", label=f"pool ({num_pages})")
  bottom.set_ylabel("cache pages in use")
  bottom.set_xlabel("seconds")
  bottom.legend(loc="upper right", fontsize=7)
  if title:
    top.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
