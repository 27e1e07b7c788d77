"""Multi-query associative recall (MQAR, Zoology): a task only attention solves.

An example shows n key-value pairs, a separator, then m of its keys again,
each followed by its value:

    k3 v7 k0 v2 k5 v5 SEP k0 v2 k5 v5        (n = 3 pairs, m = 2 queries)

The model is scored on the answers (the value after each queried key): to
predict it at the query it must find the earlier occurrence of that key and
copy the token that followed. Keys are distinct within an example and drawn
at random, so no fixed mapping can be memorised.

Token ids: 0 padding, 1 separator, then `task_num_keys` keys, then
`task_num_values` values (`vocab_size` may be larger). Examples of random
length (`task_min_pairs`..`task_max_pairs` pairs) are packed greedily into
rows of `max_target_length` tokens: `segment_ids` number the examples of a
row from 1 (0 = padding), `positions` restart at 0 with each example.

Every row is a pure function of (seed, stream, step, row index): a process
generates only the rows it feeds (`rows`), the batch is the same whatever the
process count, and a resumed run sees the data it would have seen.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from meshattn.configs.validation import RECALL_SPECIAL_TOKENS, recall_example_length

PAD, SEPARATOR = 0, 1
TRAIN_STREAM, EVAL_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class RecallTask:
  """Sizes of the task; `from_config` reads the task_* keys and max_target_length."""

  num_keys: int
  num_values: int
  min_pairs: int
  max_pairs: int
  num_queries: int
  row_length: int
  seed: int = 0

  @classmethod
  def from_config(cls, cfg) -> "RecallTask":
    return cls(num_keys=cfg.task_num_keys, num_values=cfg.task_num_values,
               min_pairs=cfg.task_min_pairs, max_pairs=cfg.task_max_pairs,
               num_queries=cfg.task_num_queries, row_length=cfg.max_target_length, seed=cfg.seed)

  def __post_init__(self):
    if not 1 <= self.min_pairs <= self.max_pairs <= self.num_keys:
      raise ValueError(f"need 1 <= min_pairs ({self.min_pairs}) <= max_pairs ({self.max_pairs}) "
                       f"<= num_keys ({self.num_keys})")
    if recall_example_length(self.max_pairs, self.num_queries) > self.row_length:
      raise ValueError(f"an example of {self.max_pairs} pairs does not fit a row of "
                       f"{self.row_length} tokens")

  @property
  def first_value(self) -> int:
    return RECALL_SPECIAL_TOKENS + self.num_keys

  @property
  def vocab_needed(self) -> int:
    return self.first_value + self.num_values

  def example(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [L], is_answer [L]) of one random example."""
    pairs = int(rng.integers(self.min_pairs, self.max_pairs + 1))
    keys = rng.choice(self.num_keys, size=pairs, replace=False) + RECALL_SPECIAL_TOKENS
    values = rng.integers(0, self.num_values, size=pairs) + self.first_value
    queried = rng.choice(pairs, size=min(pairs, self.num_queries), replace=False)
    context = np.stack([keys, values], axis=1).reshape(-1)  # k1 v1 k2 v2 ...
    queries = np.stack([keys[queried], values[queried]], axis=1).reshape(-1)  # q1 a1 ...
    tokens = np.concatenate([context, [SEPARATOR], queries]).astype(np.int32)
    is_answer = np.zeros(tokens.shape, bool)
    is_answer[len(context) + 2::2] = True  # a_i follows q_i
    return tokens, is_answer

  def row(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One packed row: inputs, targets (the next token), weights (1 where the target is
    an answer), positions and segment_ids, each [row_length]."""
    t = self.row_length
    out = {name: np.zeros(t, np.int32) for name in
           ("inputs", "targets", "positions", "segment_ids")}
    out["weights"] = np.zeros(t, np.float32)
    start, segment = 0, 1
    while True:
      tokens, is_answer = self.example(rng)
      n = len(tokens)
      if start + n > t:
        break  # the row is full: the rest stays padding (segment 0, weight 0)
      at = slice(start, start + n)
      out["inputs"][at] = tokens
      out["targets"][start:start + n - 1] = tokens[1:]  # the last token predicts nothing
      out["weights"][start:start + n - 1] = is_answer[1:]
      out["positions"][at] = np.arange(n)
      out["segment_ids"][at] = segment
      start, segment = start + n, segment + 1
    return out

  def rows(self, stream: int, step: int, row_ids) -> dict[str, np.ndarray]:
    """The rows `row_ids` of batch `step` of `stream` (TRAIN_STREAM or EVAL_STREAM), each
    [len(row_ids), row_length]; row r depends only on (seed, stream, step, r)."""
    made = [self.row(np.random.default_rng([self.seed, stream, step, int(r)])) for r in row_ids]
    return {name: np.stack([m[name] for m in made]) for name in made[0]}
