"""Serving prompts from the training task (scripts/recall_task.py), with their answers.

An example `k3 v7 k0 v2 k5 v5 SEP k0 v2 k5 v5` becomes one prompt that ends
at a randomly chosen query (`... SEP k0 v2 k5`), whose answer (`v5`) must be
the first token the model generates. Earlier queries stay in the prompt with
their answers, as in training, so prompt lengths vary with both the number of
pairs and the query chosen. Examples come from their own random stream (not
the training one), a pure function of (config seed, seed, request index).
"""

from __future__ import annotations

import numpy as np

from meshattn.scripts.recall_task import RecallTask

SERVE_STREAM = 2  # recall_task uses 0 (train) and 1 (held-out eval)


def recall_prompts(cfg, n: int, *, seed: int = 0) -> tuple[list[np.ndarray], list[int]]:
  """n (prompt [P] int32, answer) pairs of the config's recall task."""
  task = RecallTask.from_config(cfg)
  prompts, answers = [], []
  for i in range(n):
    rng = np.random.default_rng([task.seed, SERVE_STREAM, seed, i])
    tokens, is_answer = task.example(rng)
    at = int(rng.choice(np.flatnonzero(is_answer)))  # the answer of one query
    prompts.append(tokens[:at])
    answers.append(int(tokens[at]))
  return prompts, answers
