"""The serving engine's host-side scheduler: requests, slots, pages and chunks.

Pure Python and NumPy, no JAX computation: it decides, the compiled step (engine_step)
computes. Each engine step runs, in one compiled function, a decode row for
every slot (rows that are not decoding are gated off) and up to
`prefill_rows` prompt chunks of `chunk_size` tokens. The scheduler picks
them:

- admission: a waiting request gets a free slot when the page pool can hold
  its worst case (prompt + max_new_tokens - 1 tokens; the last sampled token
  is never written), and the engine reserves those pages at once
  (engine_pages). A running request can then never run out of pages (no
  preemption), and the page tables change only when a request arrives or
  leaves, not at every page boundary. Lazy reservation would not admit more:
  admission already counts the worst case;
- chunks: the oldest admitted requests still prefilling get one row each, the
  next `chunk_size` tokens of their prompt (the last chunk is shorter and
  right-padded). The chunk that ends a prompt yields its first output token;
- decode: every slot whose prompt is cached decodes its last sampled token;
- finish: a request stops after `max_new_tokens` tokens or on `end_token`
  (kept in its output); its slot and pages go back at once.

Cache length of a sequence = prompt tokens cached + output tokens - 1 once
it decodes: the newest sampled token is fed (and written) by the next step.
`plan` advances these counts at once, so the next step can be planned
before the last one's tokens are read back (`commit`).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import numbers

import numpy as np

from meshattn.configs.vocabulary import token_range_problem
from meshattn.layers.sampling import SamplingParams, params_problem


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation request: up to `max_new_tokens` after `prompt`, picked as `sampling`
  says (default greedy; layers/sampling.py)."""
  id: int
  prompt: np.ndarray  # [P] int32 token ids
  max_new_tokens: int
  arrival: float = 0.0  # seconds after the trace starts (Engine.run)
  sampling: SamplingParams = SamplingParams()


@dataclasses.dataclass(eq=False)
class Sequence:
  """A request while it holds a slot.

  Planning runs one step ahead of the sampled values (the engine plans and
  dispatches step n+1 while step n runs): `prefilled` and `planned` count
  what the planned steps will have done, `output` holds the tokens already
  read back. A decode row whose token is not back yet takes it on the device
  from row `last_row` of the previous step's outputs."""
  request: Request
  slot: int
  prefilled: int = 0  # prompt tokens cached once the planned steps ran
  planned: int = 0  # output tokens the planned steps produce
  output: list[int] = dataclasses.field(default_factory=list)  # tokens read back so far
  finish_reason: str | None = None  # "length" or "end_token", once its last token is back
  last_row: int = -1  # output row of the last planned step that samples token `planned - 1`

  @property
  def prompt_length(self) -> int:
    return len(self.request.prompt)

  @property
  def decoding(self) -> bool:
    """Its next step is a decode row: prompt planned, tokens left, not stopped."""
    return (self.prefilled == self.prompt_length and 1 <= self.planned
            < self.request.max_new_tokens and self.finish_reason is None)

  @property
  def cache_length(self) -> int:
    """Tokens in this slot's cache once the planned steps ran."""
    return self.prefilled + max(self.planned - 1, 0)

  @property
  def worst_case_tokens(self) -> int:
    return self.prompt_length + self.request.max_new_tokens - 1


@dataclasses.dataclass(frozen=True)
class Chunk:
  """One prefill row of a step: prompt[start:start + len(tokens)] into `slot`."""
  slot: int
  start: int
  tokens: np.ndarray  # [n] int32, n <= chunk_size
  last: bool  # the prompt ends in this chunk: the row's logits give the first output token


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """What one engine step runs. Its outputs are [S] decode rows (by slot), then [R] chunk
  rows. decode_tokens[i] is fed unless decode_sources[i] >= 0: then the previous step's
  output row decode_sources[i] is (sampled on the device, not yet read back).
  lengths_after: slot -> cache tokens it holds after the step."""
  decode_slots: tuple[int, ...]
  decode_tokens: tuple[int, ...]
  decode_positions: tuple[int, ...]  # each row's position in its sequence
  chunks: tuple[Chunk, ...]
  lengths_after: dict[int, int]
  decode_sources: tuple[int, ...] = ()  # () = every token from the host
  decode_sequences: tuple[Sequence, ...] = ()  # for commit (a slot may change hands meanwhile)
  chunk_sequences: tuple[Sequence, ...] = ()

  @property
  def empty(self) -> bool:
    return not self.decode_slots and not self.chunks

  @property
  def num_tokens(self) -> int:
    return len(self.decode_slots) + sum(len(c.tokens) for c in self.chunks)


class Scheduler:
  """Slots, page budget and chunk planning for `num_slots` sequences (see module doc)."""

  def __init__(self, *, num_slots: int, max_length: int, num_pages: int, tokens_per_page: int,
               chunk_size: int, prefill_rows: int = 1, end_token: int | None = None,
               vocab_size: int | None = None):
    for name, value in (("num_slots", num_slots), ("max_length", max_length),
                        ("num_pages", num_pages), ("tokens_per_page", tokens_per_page),
                        ("chunk_size", chunk_size), ("prefill_rows", prefill_rows)):
      if int(value) < 1:
        raise ValueError(f"Scheduler: {name} must be >= 1, got {value}")
    self.num_slots, self.max_length = num_slots, max_length
    self.num_pages, self.tokens_per_page = num_pages, tokens_per_page
    self.chunk_size, self.prefill_rows = chunk_size, prefill_rows
    self.end_token = end_token
    self.vocab_size = vocab_size  # None: prompt ids are checked for >= 0 only
    self.waiting: collections.deque[Request] = collections.deque()
    self.running: dict[int, Sequence] = {}  # slot -> sequence, in admission order
    self.committed_pages = 0  # worst-case pages of the running sequences

  # ---- requests ---------------------------------------------------------------

  def pages_for(self, tokens: int) -> int:
    return math.ceil(tokens / self.tokens_per_page)

  def validate(self, request: Request) -> None:
    """Raise ValueError naming the field if `request` can never be served."""
    prompt = np.asarray(request.prompt)
    if prompt.ndim != 1 or prompt.size < 1 or not np.issubdtype(prompt.dtype, np.integer):
      raise ValueError(f"request {request.id}: prompt must be a non-empty 1-D array of integer "
                       f"token ids, got shape {prompt.shape} dtype {prompt.dtype}")
    # The decoder's own check (layers/decoder.py) cannot run inside the compiled step, where
    # an id outside the vocabulary reads a NaN embedding row and decodes junk. Compared
    # before any cast, so a uint64 stays positive.
    problem = token_range_problem(prompt.min(), prompt.max(), self.vocab_size)
    if problem:
      raise ValueError(f"request {request.id}: prompt tokens must be {problem}")
    if not isinstance(request.sampling, SamplingParams):
      raise ValueError(f"request {request.id}: sampling must be a SamplingParams "
                       f"(layers/sampling.py), got {type(request.sampling).__name__}")
    problem = params_problem(request.sampling)  # a frozen dataclass can still be forced
    if problem:
      raise ValueError(f"request {request.id}: sampling: {problem}")
    count = request.max_new_tokens
    if not _is_int(count) or count < 1:
      raise ValueError(f"request {request.id}: max_new_tokens must be an integer >= 1 (an int, "
                       f"not a float or bool), got {count!r}")
    total = prompt.size + request.max_new_tokens - 1
    if total > self.max_length:
      raise ValueError(f"request {request.id}: prompt ({prompt.size}) + max_new_tokens "
                       f"({request.max_new_tokens}) - 1 = {total} tokens exceed the cache's "
                       f"max_length={self.max_length}")
    if self.pages_for(total) > self.num_pages:
      raise ValueError(f"request {request.id}: needs {self.pages_for(total)} pages of "
                       f"{self.tokens_per_page} tokens, the pool has num_pages={self.num_pages}")

  def submit(self, request: Request) -> None:
    self.validate(request)
    self.waiting.append(request)

  def admit(self) -> list[Sequence]:
    """Give free slots to waiting requests, first come first served, while pages allow."""
    admitted = []
    free = [s for s in range(self.num_slots) if s not in self.running]
    while self.waiting and free:
      request = self.waiting[0]
      need = self.pages_for(len(request.prompt) + request.max_new_tokens - 1)
      if self.committed_pages + need > self.num_pages:
        break  # head-of-line waits: later requests do not overtake it
      self.waiting.popleft()
      sequence = Sequence(request, free.pop(0))
      self.running[sequence.slot] = sequence
      self.committed_pages += need
      admitted.append(sequence)
    return admitted

  @property
  def idle(self) -> bool:
    return not self.waiting and not self.running

  # ---- steps ------------------------------------------------------------------

  def plan(self) -> StepPlan:
    """The next step (every decoding slot, the oldest prefilling slots' next chunks), and
    advance the planned counts by it. At most one planned step may await its commit."""
    decoding = [s for s in self.running.values() if s.decoding]
    prefilling = [s for s in self.running.values() if s.prefilled < s.prompt_length]
    chunks, chunk_sequences = [], prefilling[:self.prefill_rows]
    for seq in chunk_sequences:
      end = min(seq.prefilled + self.chunk_size, seq.prompt_length)
      tokens = np.asarray(seq.request.prompt[seq.prefilled:end], np.int32)
      chunks.append(Chunk(seq.slot, seq.prefilled, tokens, end == seq.prompt_length))
    back = [len(s.output) == s.planned for s in decoding]  # last token read back already
    plan = StepPlan(
        decode_slots=tuple(s.slot for s in decoding),
        decode_tokens=tuple(s.output[-1] if b else 0 for s, b in zip(decoding, back)),
        decode_positions=tuple(s.cache_length for s in decoding),
        chunks=tuple(chunks),
        lengths_after={**{s.slot: s.cache_length + 1 for s in decoding},
                       **{c.slot: c.start + len(c.tokens) for c in chunks}},
        decode_sources=tuple(-1 if b else s.last_row for s, b in zip(decoding, back)),
        decode_sequences=tuple(decoding), chunk_sequences=tuple(chunk_sequences))
    for seq in decoding:
      seq.planned += 1
      seq.last_row = seq.slot
    for row, (seq, chunk) in enumerate(zip(chunk_sequences, chunks)):
      seq.prefilled = chunk.start + len(chunk.tokens)
      if chunk.last:
        seq.planned, seq.last_row = 1, self.num_slots + row
    return plan

  def commit(self, plan: StepPlan, tokens: np.ndarray) -> list[Sequence]:
    """Take a step's sampled tokens [S + R] (decode rows by slot, then chunk rows). Returns
    the sequences that finished; their slots and pages are free again. Rows of a sequence
    that stopped on end_token in the step before are dropped (planned before it was known)."""
    finished = []
    for row, (seq, chunk) in enumerate(zip(plan.chunk_sequences, plan.chunks)):
      if chunk.last and seq.finish_reason is None:
        finished += self._append(seq, tokens[self.num_slots + row])
    for seq in plan.decode_sequences:
      if seq.finish_reason is None:
        finished += self._append(seq, tokens[seq.slot])
    for seq in finished:
      del self.running[seq.slot]
      self.committed_pages -= self.pages_for(seq.worst_case_tokens)
    return finished

  def _append(self, seq: Sequence, token) -> list[Sequence]:
    seq.output.append(int(token))
    if self.end_token is not None and int(token) == self.end_token:
      seq.finish_reason = "end_token"
    elif len(seq.output) >= seq.request.max_new_tokens:
      seq.finish_reason = "length"
    return [seq] if seq.finish_reason else []

  def drop_all(self) -> list[int]:
    """Forget every waiting and running request; returns the slots that were running."""
    slots = list(self.running)
    self.waiting.clear()
    self.running.clear()
    self.committed_pages = 0
    return slots

  def pages_reserved(self) -> int:
    """Pages the running requests hold (their worst case, reserved at admission)."""
    return self.committed_pages

  def pages_filled(self) -> int:
    """Pages holding cached tokens of the running requests once the planned steps ran."""
    return sum(self.pages_for(seq.cache_length) for seq in self.running.values())


def _is_int(value) -> bool:
  """A Python or NumPy integer; not a bool (an int subclass) and not a float (2.9 would
  be truncated to 2)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
