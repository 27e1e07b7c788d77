"""The serving tests' reference: a plain uncached greedy decode through the train forward."""

import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_reference(model, prompt, max_new, width=32):
  """Uncached greedy decode: the whole sequence through the train forward for each token.
  Right padding to one width (segment 0) keeps it one compile; causal, so it changes nothing."""
  forward = nnx.jit(lambda m, t, s: m(t, segment_ids=s, model_mode="train"))
  sequence = list(prompt)
  for _ in range(max_new):
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(sequence)] = sequence
    segments = (np.arange(width) < len(sequence)).astype(np.int32)[None]
    logits = forward(model, jnp.asarray(tokens), jnp.asarray(segments))  # [1, W, V]
    sequence.append(int(jnp.argmax(logits[0, len(sequence) - 1])))
  return sequence[len(prompt):]
