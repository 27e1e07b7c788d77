"""The serving engine's host-side scheduler: requests, slots, pages and chunks.

Pure Python and NumPy, no JAX: it decides, the compiled step (engine_step)
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
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Request:
  """One generation request: greedy-decode up to `max_new_tokens` after `prompt`."""
  id: int
  prompt: np.ndarray  # [P] int32 token ids
  max_new_tokens: int
  arrival: float = 0.0  # seconds after the trace starts (Engine.run)


@dataclasses.dataclass
class Sequence:
  """A request while it holds a slot."""
  request: Request
  slot: int
  prefilled: int = 0  # prompt tokens cached so far
  output: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None  # "length" or "end_token" once done

  @property
  def prompt_length(self) -> int:
    return len(self.request.prompt)

  @property
  def decoding(self) -> bool:
    return self.prefilled == self.prompt_length and self.finish_reason is None

  @property
  def cache_length(self) -> int:
    """Tokens in this slot's cache before the next step."""
    return self.prefilled + max(len(self.output) - 1, 0)

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
  """What one engine step runs; `lengths_after`: slot -> cache tokens it holds after it."""
  decode_slots: tuple[int, ...]
  decode_tokens: tuple[int, ...]  # the token each decode slot feeds
  decode_positions: tuple[int, ...]  # its position in the sequence
  chunks: tuple[Chunk, ...]
  lengths_after: dict[int, int]

  @property
  def empty(self) -> bool:
    return not self.decode_slots and not self.chunks

  @property
  def num_tokens(self) -> int:
    return len(self.decode_slots) + sum(len(c.tokens) for c in self.chunks)


class Scheduler:
  """Slots, page budget and chunk planning for `num_slots` sequences (see module doc)."""

  def __init__(self, *, num_slots: int, max_length: int, num_pages: int, tokens_per_page: int,
               chunk_size: int, prefill_rows: int = 1, end_token: int | None = None):
    for name, value in (("num_slots", num_slots), ("max_length", max_length),
                        ("num_pages", num_pages), ("tokens_per_page", tokens_per_page),
                        ("chunk_size", chunk_size), ("prefill_rows", prefill_rows)):
      if int(value) < 1:
        raise ValueError(f"Scheduler: {name} must be >= 1, got {value}")
    self.num_slots, self.max_length = num_slots, max_length
    self.num_pages, self.tokens_per_page = num_pages, tokens_per_page
    self.chunk_size, self.prefill_rows = chunk_size, prefill_rows
    self.end_token = end_token
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
    if request.max_new_tokens < 1:
      raise ValueError(f"request {request.id}: max_new_tokens must be >= 1, "
                       f"got {request.max_new_tokens}")
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
    """The next step: every decoding slot, and the oldest prefilling slots' next chunks."""
    decoding = [s for s in self.running.values() if s.decoding]
    prefilling = [s for s in self.running.values() if s.prefilled < s.prompt_length]
    chunks = []
    for seq in prefilling[:self.prefill_rows]:
      end = min(seq.prefilled + self.chunk_size, seq.prompt_length)
      tokens = np.asarray(seq.request.prompt[seq.prefilled:end], np.int32)
      chunks.append(Chunk(seq.slot, seq.prefilled, tokens, end == seq.prompt_length))
    lengths_after = {s.slot: s.cache_length + 1 for s in decoding}
    lengths_after.update({c.slot: c.start + len(c.tokens) for c in chunks})
    return StepPlan(
        decode_slots=tuple(s.slot for s in decoding),
        decode_tokens=tuple(s.output[-1] for s in decoding),
        decode_positions=tuple(s.cache_length for s in decoding),
        chunks=tuple(chunks), lengths_after=lengths_after)

  def commit(self, plan: StepPlan, decode_next: dict[int, int],
             chunk_next: dict[int, int]) -> list[Sequence]:
    """Apply a finished step: slot -> sampled token for decode rows and for prompt-ending
    chunks. Returns the sequences that finished (their slots are free again)."""
    for chunk in plan.chunks:
      seq = self.running[chunk.slot]
      seq.prefilled = chunk.start + len(chunk.tokens)
      if chunk.last:
        self._append(seq, chunk_next[chunk.slot])
    for slot in plan.decode_slots:
      self._append(self.running[slot], decode_next[slot])
    finished = [s for s in self.running.values() if s.finish_reason is not None]
    for seq in finished:
      del self.running[seq.slot]
      self.committed_pages -= self.pages_for(seq.worst_case_tokens)
    return finished

  def _append(self, seq: Sequence, token: int) -> None:
    seq.output.append(int(token))
    if self.end_token is not None and int(token) == self.end_token:
      seq.finish_reason = "end_token"
    elif len(seq.output) >= seq.request.max_new_tokens:
      seq.finish_reason = "length"

  def pages_reserved(self) -> int:
    """Pages the running requests hold (their worst case, reserved at admission)."""
    return self.committed_pages

  def pages_filled(self, plan: StepPlan | None = None) -> int:
    """Pages holding cached tokens of the running requests (after `plan`, if given)."""
    after = plan.lengths_after if plan is not None else {}
    return sum(self.pages_for(after.get(slot, seq.cache_length))
               for slot, seq in self.running.items())
