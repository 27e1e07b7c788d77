"""Packed rows in NumPy: where each token stands in its own sequence (for the references)."""

import numpy as np


def sequence_index_np(ids) -> np.ndarray:
  """Each token's index within its packed sequence (a run of equal ids), [B, T]."""
  ids = np.asarray(ids)
  out = np.zeros(ids.shape, np.int64)
  for b in range(ids.shape[0]):
    for t in range(1, ids.shape[1]):
      out[b, t] = out[b, t - 1] + 1 if ids[b, t] == ids[b, t - 1] else 0
  return out


def packed_chunks(attention_type, segment_ids) -> bool:
  """Chunk masks of packed rows count from each sequence's start (one ids array for q and k)."""
  return (attention_type == "chunk" and segment_ids is not None
          and np.shape(segment_ids[0]) == np.shape(segment_ids[1])
          and np.array_equal(segment_ids[0], segment_ids[1]))


def packed_chunk_visible(ids, chunk: int) -> np.ndarray:
  """[B, T, T]: causal and in the same chunk of the same packed sequence, chunks counted from
  each sequence's first token."""
  t = np.asarray(ids).shape[1]
  causal = np.tril(np.ones((t, t), bool))
  c = sequence_index_np(ids) // chunk  # [B, T]
  return causal & (c[:, :, None] == c[:, None, :])


def packed_or_token_index(attention_type, segment_ids, batch: int, length: int):
  """Per row, the index chunks count from: within the sequence for packed chunk masks, else
  the token index."""
  if packed_chunks(attention_type, segment_ids):
    return sequence_index_np(segment_ids[0])
  return [list(range(length))] * batch
