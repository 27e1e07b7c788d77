"""A continuous-batching serving engine over the paged KV cache.

    engine = Engine(model, num_slots=8, chunk_size=32)   # model: a Decoder (layers.decoder)
    engine.warmup()                                      # compile the step kinds, run each kernel once
    rid = engine.submit(prompt_ids, max_new_tokens=16)
    while not engine.idle:
      for result in engine.step():                       # finished requests, this step
        print(result.id, result.tokens)
    engine.results()[rid].tokens                         # or: engine.run(requests) for a trace

Requests arrive at any time (`submit`, or `run` replaying a trace of
arrival times), get a slot and cache pages, have their prompt prefilled in
chunks interleaved with the decode steps of the running requests, and free
their slot and pages when they finish (max_new_tokens or `end_token`).
Sampling is greedy unless a request asks otherwise (`sampling=SamplingParams(temperature,
top_k, top_p, seed)`, layers/sampling.py, reproducible whatever the schedule). Each
step is one compiled function of fixed shapes
(engine_step): a decode row per slot plus `prefill_rows` chunks of
`chunk_size` tokens. The host dispatches step n+1 before reading step n's
tokens (`overlap`), so its own work hides behind the device's. The host
side (admission, chunks) is engine_schedule, the page tables of every layer
engine_pages, the measurements engine_metrics.

Several processes (multi-host): every process builds the same Engine over the same
global model and makes the same calls in the same order (submit, step, run, with the
same requests); the host side is deterministic, so each plans the same steps, feeds the
same host arrays (placed as replicated global arrays) and reads back the same
replicated tokens. `run` takes process 0's arrivals, so real-time traces agree too.

The model is anything with the decoder's serving interface:
`model(tokens, positions, segment_ids, model_mode=..., slots=...)` ->
logits [B, T, vocab], `model.init_cache(batch, max_length, paged=True)`,
`model.caches()` (one PagedKVCache per layer; a hybrid model's linear layers keep a
LinearStateCache, a state per slot, and are served in the same steps), and
`model.config.vocab_size` if it has one (submit then refuses prompt ids outside the
vocabulary).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from collections.abc import Callable, Iterable

import jax
import numpy as np
from flax import nnx

from meshattn.kvcache.paged import PagedKVCache
from meshattn.kvcache.state import LinearStateCache
from meshattn.layers.attention import Attention
from meshattn.layers.cache_specs import PagedCache, StateCache
from meshattn.layers.engine_metrics import RequestResult, StepRecord, plot_timeline, summarize
from meshattn.layers.engine_pages import EnginePages
from meshattn.layers.engine_schedule import Request, Scheduler, StepPlan
from meshattn.layers.engine_step import (KINDS, first_previous, make_engine_step, run_step,
                                         step_inputs)
from meshattn.layers.sampling import SamplingParams
from meshattn.layers.serving import raise_if_rejected
from meshattn.sharding import process0_value

__all__ = ["Engine", "Request", "RequestResult", "SamplingParams", "StepRecord", "summarize",
           "plot_timeline"]


class Engine:
  """Continuous batching of generation requests over `num_slots` cache slots."""

  def __init__(self, model, *, num_slots: int, chunk_size: int, prefill_rows: int = 1,
               max_length: int | None = None, end_token: int | None = None,
               specialize: bool = True, overlap: bool = True,
               clock: Callable[[], float] = time.perf_counter):
    for name, value in (("num_slots", num_slots), ("chunk_size", chunk_size),
                        ("prefill_rows", prefill_rows)):
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"Engine: {name} must be an integer >= 1, got {value!r}")
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if end_token is not None and (isinstance(end_token, bool)
                                  or not isinstance(end_token, numbers.Integral)
                                  or end_token < 0 or (vocab_size and end_token >= vocab_size)):
      raise ValueError(f"Engine: end_token must be None or a token id in [0, "
                       f"{vocab_size or 'vocab_size'}), got {end_token!r}")
    if prefill_rows > num_slots:
      raise ValueError(f"Engine: prefill_rows={prefill_rows} must be <= num_slots={num_slots} "
                       "(each chunk row fills its own slot)")
    _check_layers(model, chunk_size)
    self.model = model
    model.init_cache(num_slots, max_length, paged=True)
    self.caches = list(model.caches())
    paged = [c for c in self.caches if isinstance(c, PagedKVCache)]
    first = paged[0]
    shape = lambda c: (c.max_length, c.num_pages, c.tokens_per_page)
    if any(shape(c) != shape(first) for c in paged):
      raise ValueError("Engine: every layer's paged cache must have the same max_length, "
                       "num_pages and tokens_per_page")
    if any(c.max_length != first.max_length for c in self.caches):
      raise ValueError("Engine: every layer's cache must have the same max_length")
    self.num_slots, self.chunk_size, self.prefill_rows = num_slots, chunk_size, prefill_rows
    self.max_length, self.num_pages = first.max_length, first.num_pages
    self.scheduler = Scheduler(num_slots=num_slots, max_length=first.max_length,
                               num_pages=first.num_pages, tokens_per_page=first.tokens_per_page,
                               chunk_size=chunk_size, prefill_rows=prefill_rows,
                               end_token=end_token, vocab_size=vocab_size)
    self.pages = EnginePages(self.caches)  # the engine owns the caches' pages from here
    # specialize=False runs every step as the mixed kind (gated rows cost their shape): one
    # compile instead of three, for short runs where compiling is most of the time.
    self.kinds = KINDS if specialize else ("mixed",)
    self._step = make_engine_step()
    self.overlap = overlap  # dispatch step n+1 before reading step n (see step)
    self._previous = first_previous(model, num_slots, prefill_rows)  # last step's tokens
    self._in_flight: _InFlight | None = None
    # Internal times are seconds since the engine was built, on a clock that never restarts;
    # records show them from `_clock_start` (when `run` last started or ended, 0 before) and
    # keep it, so that summary can add up the runs without overlapping them.
    self._clock = clock
    self._t0 = clock()
    self._clock_start = 0.0
    self._next_id = 0
    self._arrival: dict[int, float] = {}
    self._first_token: dict[int, float] = {}
    self._results: dict[int, RequestResult] = {}
    self.steps: list[StepRecord] = []

  # ---- requests ---------------------------------------------------------------

  def now(self) -> float:
    """Seconds on the engine's clock since it was built (or since `run` last started or
    ended: each run's records are timed from its start)."""
    return self._elapsed() - self._clock_start

  def _elapsed(self) -> float:
    """Seconds since the engine was built (never restarts)."""
    return self._clock() - self._t0

  def submit(self, prompt, max_new_tokens: int, *, id: int | None = None,
             arrival: float | None = None, sampling: SamplingParams | None = None) -> int:
    """Queue a request: up to max_new_tokens after prompt [P] (token ids), greedy or as
    `sampling` says (SamplingParams: temperature, top_k, top_p, seed; a seed of None
    becomes the request id, so a run is reproducible).

    Returns its id. Raises ValueError naming the field, with nothing queued, if it can
    never be served: prompt empty, not integer ids, or ids outside [0, vocab_size);
    max_new_tokens not an integer >= 1; too long for the cache's max_length or page
    pool; an id already taken; sampling not a SamplingParams. `arrival` is on `now()`'s
    clock (default: now), finite and not after now."""
    now = self.now()
    request = self._checked_request(prompt, max_new_tokens, id, now if arrival is None else arrival,
                                    latest_arrival=now, fields=False, sampling=sampling)
    self.scheduler.submit(request)  # checks the fields (Scheduler.validate)
    self._arrival[request.id] = self._clock_start + request.arrival
    self._next_id = max(self._next_id, request.id + 1)
    return request.id

  def _checked_request(self, prompt, max_new_tokens, id, arrival, *,
                       latest_arrival: float | None, fields: bool = True,
                       sampling: SamplingParams | None = None) -> Request:
    """The Request `submit` would queue, or ValueError naming the field (nothing changes).
    fields=False leaves the prompt / length checks to Scheduler.submit, which runs them."""
    if id is not None and (isinstance(id, bool) or not isinstance(id, (int, np.integer))):
      raise ValueError(f"Engine.submit: id must be an int (or None: the next free id), got {id!r}")
    rid = self._next_id if id is None else int(id)
    if rid in self._arrival:
      raise ValueError(f"Engine.submit: request id {rid} was already submitted")
    if isinstance(arrival, bool) or not isinstance(arrival, numbers.Real) \
        or not math.isfinite(arrival):
      raise ValueError(f"request {rid}: arrival must be a finite number of seconds on the "
                       f"engine's clock (now()), got {arrival!r}")
    if latest_arrival is not None and arrival > latest_arrival:
      # A request cannot arrive after it is queued: its waiting time would be negative.
      raise ValueError(f"request {rid}: arrival={arrival} is after now()={latest_arrival}; "
                       "submit a request once it has arrived (Engine.run replays a trace)")
    sampling = SamplingParams() if sampling is None else sampling
    if not isinstance(sampling, SamplingParams):
      raise ValueError(f"request {rid}: sampling must be a SamplingParams (or None: greedy), "
                       f"got {type(sampling).__name__}")
    if sampling.seed is None:  # reproducible by default: the request's own stream
      sampling = dataclasses.replace(sampling, seed=rid % 2**32)
    # A copy: the caller may reuse its buffer while the request waits or runs.
    try:
      prompt = np.array(prompt)
    except (TypeError, ValueError):  # a ragged nested list: not one sequence of ids
      raise ValueError(f"request {rid}: prompt must be a non-empty 1-D array of integer token "
                       f"ids, got {prompt!r}") from None
    request = Request(rid, prompt, max_new_tokens, float(arrival), sampling)
    if fields:
      self.scheduler.validate(request)
    return request

  @property
  def idle(self) -> bool:
    """Nothing waiting, running or in flight."""
    return self.scheduler.idle and self._in_flight is None

  def results(self) -> dict[int, RequestResult]:
    """Every finished request so far, by id."""
    return dict(self._results)

  # ---- steps ------------------------------------------------------------------

  def warmup(self, *, sampling: bool = False) -> int:
    """Compile every step kind, then run each kernel once, so the first requests pay neither.
    sampling=True also compiles the kinds that sample (the first step with a sampled row
    compiles them otherwise; greedy-only steps never need them).

    Compiling (every row gated off, no page changed) leaves the caches unchanged. Some
    GPU kernels are built when they first *run* (Mosaic GPU: tokamax's flash attention,
    the int8 decode kernel): on the H200 the first lm-1b step took 34 s after warmup had
    compiled it. So an idle engine then serves two scratch requests through the normal
    path (a fresh chunk, chunks continuing their slot, mixed and decode steps) and
    forgets them: their slots and pages are freed; no result, step record or id remains.
    Returns the number of scratch steps run (0 if the engine was not idle).
    """
    plan = StepPlan((), (), (), (), {})
    inputs = step_inputs(plan, self.num_slots, self.prefill_rows, self.chunk_size)
    for kind in self.kinds:
      for sampled in (False, True) if sampling else (False,):
        np.asarray(run_step(self._step, self.model, inputs, kind, self._previous, sampled)[0])
    self.pages.push(self.model, force=True)
    if self.idle and not self._arrival:
      return self._run_scratch_requests()
    return 0

  def _run_scratch_requests(self) -> int:
    """Serve two short requests (see warmup), then forget them."""
    longest = self.max_length - 1  # prompt + 2 outputs - 1 written tokens fit max_length
    prompts = [min(1, longest), min(2 * self.chunk_size + 1, longest)]
    for length in prompts:
      try:
        self.submit(np.zeros(length, np.int32), max_new_tokens=2)
      except ValueError:  # it can never fit this engine's cache: nothing to warm with it
        continue
    steps = 0
    try:
      while not self.idle:
        self.step()
        steps += 1
    finally:  # also when a scratch step failed: no scratch request may stay behind
      self._forget_requests()
    return steps

  def _forget_requests(self) -> None:
    """Drop every request, free every slot and page, clear ids, results and records."""
    for slot in self.scheduler.drop_all():
      self.pages.release(slot)
    self.pages.push(self.model)
    self._in_flight = None
    self._next_id = 0
    self._arrival.clear()
    self._first_token.clear()
    self._results.clear()
    self.steps.clear()

  def step(self) -> list[RequestResult]:
    """Admit (reserving pages), plan and dispatch one compiled step, then read back the
    previous step's tokens (overlap) or this one's, free finished requests' slots.

    With `overlap` (the default) the host plans and dispatches step n+1 before reading
    step n's tokens, so its own work runs while the device computes: decode rows take
    their token from step n's outputs on the device, and a request that stops on
    `end_token` in step n has one more row in step n+1, whose token is dropped.
    Returns the requests that finished (also kept in results())."""
    scheduler = self.scheduler
    admitted = scheduler.admit()
    if admitted:  # a request's worst case, reserved once (engine_schedule: admission)
      self.pages.reserve([s.slot for s in admitted], [s.worst_case_tokens for s in admitted])
      self.pages.push(self.model)  # every layer's tables, in one call
    plan = scheduler.plan()
    launched = None
    if not plan.empty:
      inputs = step_inputs(plan, self.num_slots, self.prefill_rows, self.chunk_size)
      kind = inputs.kind if inputs.kind in self.kinds else "mixed"
      started = self._elapsed()
      tokens, bits = run_step(self._step, self.model, inputs, kind, self._previous)
      self._previous = tokens
      launched = _InFlight(plan, inputs.kind, tokens, bits, started, len(scheduler.running),
                           len(scheduler.waiting), scheduler.pages_reserved(),
                           scheduler.pages_filled())
    finished = []
    if self._in_flight is not None:  # step n, while step n+1 runs
      finished = self._read_back(self._in_flight, idle_after=launched is None)
    self._in_flight = launched
    if launched is not None and not self.overlap:
      finished += self._read_back(launched, idle_after=True)
      self._in_flight = None
    return finished

  def _read_back(self, step: "_InFlight", *, idle_after: bool) -> list[RequestResult]:
    """Wait for a dispatched step's tokens, commit them, free the finished requests."""
    tokens = np.asarray(step.tokens)  # [S + R]: waits for the step
    if int(np.asarray(step.bits)):
      raise_if_rejected(self.model)
    done_at = self._elapsed()
    plan, scheduler = step.plan, self.scheduler
    # Requests whose prompt ends in this step get their first token now.
    self._first_token.update({seq.request.id: done_at for seq, chunk
                              in zip(plan.chunk_sequences, plan.chunks) if chunk.last})
    finished = scheduler.commit(plan, tokens)
    for seq in finished:
      self.pages.release(seq.slot)
    self.pages.push(self.model)  # (only if something was released)
    out, origin = [], self._clock_start
    for seq in finished:
      rid = seq.request.id
      result = RequestResult(rid, seq.request.prompt, list(seq.output), seq.finish_reason,
                             self._arrival[rid] - origin, self._first_token.pop(rid) - origin,
                             done_at - origin, clock_start=origin)
      self._results[rid] = result
      out.append(result)
    self.steps.append(StepRecord(
        start=step.started - origin, time=done_at - origin, kind=step.kind,
        decode_rows=len(plan.decode_slots), chunk_rows=len(plan.chunks), tokens=plan.num_tokens,
        running=step.running, waiting=step.waiting, pages_reserved=step.pages_reserved,
        pages_filled=step.pages_filled, idle_after=idle_after and scheduler.idle,
        clock_start=origin))
    return out

  def run(self, requests: Iterable[Request], *, realtime: bool = True) -> dict[int, RequestResult]:
    """Replay a trace: each request is submitted once the clock passes its arrival.

    The clock restarts at 0: the run's records show times from its start (a request
    submitted before it gets a negative arrival), and again when it returns, so that
    steps called later are a stretch of their own in summary(). With realtime=False every
    request arrives at once (a throughput run). Steps until every request has finished.
    Every request is checked first (as `submit` checks; ids unique): a ValueError naming
    the request and field leaves nothing queued. On several processes each runs `run`
    with the same trace; the arrivals each step takes are process 0's (one broadcast per
    loop), so every process plans the same steps."""
    pending = list(requests)
    strays = [r for r in pending if not isinstance(r, Request)]
    if strays:
      raise ValueError(f"Engine.run takes Request objects (meshattn.layers.engine.Request), "
                       f"got {type(strays[0]).__name__}: {strays[0]!r}"[:300])
    # The whole trace is checked before anything is queued: a bad request late in it would
    # otherwise fail the run halfway, with earlier ones queued and their ids taken.
    ids = [r.id for r in pending]
    if len(set(ids)) != len(ids):
      twice = sorted({i for i in ids if ids.count(i) > 1})
      raise ValueError(f"Engine.run: request ids must be unique, {twice} appear more than once")
    for r in pending:
      self._checked_request(r.prompt, r.max_new_tokens, r.id, r.arrival, latest_arrival=None,
                            sampling=r.sampling)
    pending.sort(key=lambda r: r.arrival)
    self._clock_start = self._elapsed()
    i = 0
    while i < len(pending) or not self.idle:
      now = self.now()
      arrived = i
      while arrived < len(pending) and (not realtime or pending[arrived].arrival <= now):
        arrived += 1
      # Several processes run this loop on their own clocks: all take process 0's count,
      # so they submit the same requests before the same step (identical schedules).
      for r in pending[i:process0_value(arrived)]:
        arrival = min(r.arrival, self.now()) if realtime else 0.0  # a later local clock
        self.submit(r.prompt, r.max_new_tokens, id=r.id, arrival=arrival, sampling=r.sampling)
        i += 1
      if self.idle and i < len(pending):
        time.sleep(max(pending[i].arrival - self.now(), 0.0))
        continue
      self.step()
    self._clock_start = self._elapsed()
    return {r.id: self._results[r.id] for r in pending}

  def summary(self) -> dict:
    """Every finished request and step so far, over all runs (engine_metrics.summarize)."""
    return summarize(list(self._results.values()), self.steps)


def _check_layers(model, chunk_size: int) -> None:
  """Refuse settings the step cannot serve, before any cache is built (so a refused model
  keeps its caches)."""
  kinds = set()
  for _, node in nnx.iter_graph(model):
    if isinstance(node, Attention):
      s = node.settings
      kinds.add(type(s.cache_for(paged=True)))
      if chunk_size > s.max_prefill_predict_length:
        raise ValueError(f"Engine: chunk_size={chunk_size} exceeds the layers' "
                         f"max_prefill_predict_length={s.max_prefill_predict_length}")
      if not s.mask.is_causal:
        raise ValueError("Engine: a bidirectional (attention_type='full') layer cannot be "
                         "served in chunks and decode steps; use a causal attention_type")
  # Softmax layers keep paged K/V; a hybrid model's linear layers a state per slot.
  if PagedCache not in kinds or not kinds <= {PagedCache, StateCache}:
    names = {PagedCache: PagedKVCache.__name__, StateCache: LinearStateCache.__name__}
    raise ValueError(f"Engine needs a model whose init_cache(paged=True) builds PagedKVCaches "
                     f"(and LinearStateCaches for linear layers; at least one paged), got "
                     f"{sorted(names.get(k, k.__name__) for k in kinds)}")


@dataclasses.dataclass(frozen=True)
class _InFlight:
  """A dispatched step whose tokens are not read back yet, and the counts during it."""
  plan: StepPlan
  kind: str
  tokens: jax.Array  # [S + R]
  bits: jax.Array  # rejection bits
  started: float
  running: int
  waiting: int
  pages_reserved: int
  pages_filled: int
