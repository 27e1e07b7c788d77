"""The engine's compiled step: decode rows and prefill chunks in one jitted function.

One step runs, inside one `jit_step` (compiled once per kind, caches donated):

  1. a decode call over every slot, tokens [S, 1]; a row whose slot is not
     decoding has segment id 0, so it writes nothing and outputs nothing;
  2. a prefill call of `prefill_rows` rows x `chunk_size` tokens [R, C] into
     the slots `chunk_slots` [R], right-padded (segment id 0), whose logits
     at each row's last real token give that row's next token.

The two calls are separate so that each row pays only for its own shape: a
decode row costs one token, never a chunk's width of padding (the mixed
step costs about its decode part plus its chunk part, not S x C). A step
with no chunk (or no decoding slot) runs the decode-only (chunk-only)
variant: three compiled variants at most, each of fixed shapes.

Sampling runs inside the step (greedy, or temperature / top-k / top-p per request:
layers/sampling.py): only S + R int32 tokens come back,
[S] by slot then [R] by chunk row, with the OR of the caches' rejection
bits. A decode row may take its token from the previous step's outputs on
the device (`decode_sources`), so the host can dispatch step n+1 before
reading step n's tokens (layers/engine.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from meshattn.layers.engine_schedule import StepPlan
from meshattn.layers.sampling import sample
from meshattn.layers.serving import caches_of, jit_step, rejected_bits

KINDS = ("decode", "chunk", "mixed")


@dataclasses.dataclass(frozen=True)
class StepInputs:
  """Host arrays of one step, fixed shapes: S = slots, R = prefill rows, C = chunk size."""
  decode_tokens: np.ndarray  # [S, 1] int32
  decode_sources: np.ndarray  # [S, 1] int32: -1 = decode_tokens, else a previous output row
  decode_positions: np.ndarray  # [S, 1] int32
  decode_segments: np.ndarray  # [S, 1] int32, 1 = the slot decodes
  chunk_tokens: np.ndarray  # [R, C] int32
  chunk_positions: np.ndarray  # [R, C] int32
  chunk_segments: np.ndarray  # [R, C] int32, 0 = right padding
  chunk_slots: np.ndarray  # [R] int32, distinct
  chunk_last: np.ndarray  # [R] int32, index of each row's last real token
  # Each output row's sampling (decode rows by slot, then chunk rows; layers/sampling.py):
  temperature: np.ndarray  # [S + R] float32, 0 = greedy
  top_k: np.ndarray  # [S + R] int32, 0 = off
  top_p: np.ndarray  # [S + R] float32, 1 = off
  seed: np.ndarray  # [S + R] uint32
  sample_position: np.ndarray  # [S + R] int32: where the sampled token goes in its sequence

  @property
  def kind(self) -> str:
    decode, chunk = self.decode_segments.any(), self.chunk_segments.any()
    return "mixed" if decode and chunk else "chunk" if chunk else "decode"

  @property
  def sampled(self) -> bool:
    """Some row samples (else the step's argmax variant runs: no sort over the vocabulary)."""
    return bool((self.temperature > 0).any())


def step_inputs(plan: StepPlan, num_slots: int, prefill_rows: int, chunk_size: int) -> StepInputs:
  """Lay a plan out in the step's fixed shapes (unused rows gated off)."""
  decode_tokens = np.zeros((num_slots, 1), np.int32)  # [S, 1]
  decode_positions = np.zeros((num_slots, 1), np.int32)  # [S, 1]
  decode_segments = np.zeros((num_slots, 1), np.int32)  # [S, 1]
  decode_sources = np.full((num_slots, 1), -1, np.int32)  # [S, 1]
  sources = plan.decode_sources or (-1,) * len(plan.decode_slots)
  for slot, token, position, source in zip(plan.decode_slots, plan.decode_tokens,
                                           plan.decode_positions, sources):
    decode_tokens[slot, 0], decode_positions[slot, 0], decode_segments[slot, 0] = token, position, 1
    decode_sources[slot, 0] = source
  chunk_tokens = np.zeros((prefill_rows, chunk_size), np.int32)  # [R, C]
  chunk_positions = np.zeros((prefill_rows, chunk_size), np.int32)  # [R, C]
  chunk_segments = np.zeros((prefill_rows, chunk_size), np.int32)  # [R, C]
  chunk_last = np.zeros((prefill_rows,), np.int32)  # [R]
  # Unused rows still name a slot (distinct from the others); they write nothing.
  used = {c.slot for c in plan.chunks}
  spare = iter(s for s in range(num_slots) if s not in used)
  chunk_slots = np.array([c.slot for c in plan.chunks]
                         + [next(spare) for _ in range(prefill_rows - len(plan.chunks))], np.int32)
  for row, chunk in enumerate(plan.chunks):
    n = len(chunk.tokens)
    chunk_tokens[row, :n] = chunk.tokens
    chunk_positions[row] = chunk.start + np.arange(chunk_size)
    chunk_segments[row, :n] = 1
    chunk_last[row] = n - 1
  sampling = _sampling_rows(plan, num_slots, prefill_rows)
  return StepInputs(decode_tokens, decode_sources, decode_positions, decode_segments,
                    chunk_tokens, chunk_positions, chunk_segments, chunk_slots, chunk_last,
                    **sampling)


def _sampling_rows(plan: StepPlan, num_slots: int, prefill_rows: int) -> dict:
  """The sampling arrays [S + R] of a plan's output rows (unused rows, and chunks that do
  not end their prompt, whose token is dropped: greedy, so such a step needs no sort)."""
  rows = num_slots + prefill_rows
  out = dict(temperature=np.zeros((rows,), np.float32), top_k=np.zeros((rows,), np.int32),
             top_p=np.ones((rows,), np.float32), seed=np.zeros((rows,), np.uint32),
             sample_position=np.zeros((rows,), np.int32))
  decode = [(seq.slot, seq, position + 1) for seq, position in
            zip(plan.decode_sequences, plan.decode_positions)]
  chunks = [(num_slots + row, seq, chunk.start + len(chunk.tokens))
            for row, (seq, chunk) in enumerate(zip(plan.chunk_sequences, plan.chunks))
            if chunk.last]
  for row, seq, position in decode + chunks:
    params = seq.request.sampling
    out["temperature"][row], out["top_k"][row] = params.temperature, params.top_k
    out["top_p"][row], out["seed"][row] = params.top_p, params.seed or 0
    out["sample_position"][row] = position
  return out


def greedy(logits: jax.Array) -> jax.Array:
  """Greedy token ids [...] from logits [..., vocab] (first maximum, as jnp.argmax)."""
  return jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)


def _engine_step(model, decode_tokens, decode_sources, decode_positions, decode_segments,
                 chunk_tokens, chunk_positions, chunk_segments, chunk_slots, chunk_last,
                 temperature, top_k, top_p, seed, sample_position, previous, kind, sampled):
  """(next tokens [S + R]: by slot, then by chunk row; rejection bits); a part not run
  gives zeros. previous [S + R]: the last step's outputs, read where decode_sources >= 0.
  sampled (static): pick with layers/sampling.sample, else argmax (every row greedy)."""
  num_slots, rows = decode_tokens.shape[0], chunk_tokens.shape[0]
  params = (temperature, top_k, top_p, seed, sample_position)  # [S + R] each

  def pick(logits, part):  # logits [n, vocab] of the output rows `part`
    if not sampled:
      return greedy(logits)
    return sample(logits, *(x[part] for x in params))  # [n]

  next_decode = jnp.zeros((num_slots,), jnp.int32)  # [S]
  next_chunk = jnp.zeros((rows,), jnp.int32)  # [R]
  if kind in ("decode", "mixed"):
    fed = jnp.where(decode_sources >= 0, previous[jnp.maximum(decode_sources, 0)],
                    decode_tokens)  # [S, 1]
    logits = model(fed, decode_positions, decode_segments,
                   model_mode="autoregressive")  # [S, 1, vocab]
    next_decode = pick(logits[:, 0], slice(0, num_slots))  # [S]
  if kind in ("chunk", "mixed"):
    logits = model(chunk_tokens, chunk_positions, chunk_segments, model_mode="prefill",
                   slots=chunk_slots)  # [R, C, vocab]
    last = jnp.take_along_axis(logits, chunk_last[:, None, None], axis=1)[:, 0]  # [R, vocab]
    next_chunk = pick(last, slice(num_slots, num_slots + rows))  # [R]
  tokens = jnp.concatenate([next_decode, next_chunk])  # [S + R]
  if getattr(model, "mesh", None) is not None:  # replicated, like `previous` is placed
    tokens = jax.lax.with_sharding_constraint(tokens, replicated(model.mesh))
  return tokens, rejected_bits(caches_of(model))


def replicated(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def first_previous(model, num_slots: int, prefill_rows: int) -> jax.Array:
  """Outputs [S + R] to pass as `previous` before any step ran (never read)."""
  zeros = np.zeros((num_slots + prefill_rows,), np.int32)
  mesh = getattr(model, "mesh", None)
  return jax.device_put(zeros, replicated(mesh)) if mesh is not None else jnp.asarray(zeros)


def make_engine_step():
  """A fresh compiled step (its own compile cache): step(model, **StepInputs fields,
  previous=, kind=) -> (tokens [S + R], rejection bits). It does not wait for the step:
  the caller reads the bits with the tokens (`raise_if_rejected` names the reason)."""
  return jit_step(_engine_step, static_argnames=("kind", "sampled"), check=False)


def run_step(step, model, inputs: StepInputs, kind: str | None = None, previous=None,
             sampled: bool | None = None):
  """Dispatch one step; returns device arrays (tokens [S + R], rejection bits), at once."""
  fields = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(StepInputs)}
  if previous is None:
    previous = first_previous(model, inputs.decode_tokens.shape[0], inputs.chunk_tokens.shape[0])
  sampled = inputs.sampled if sampled is None else sampled
  return step(model, **fields, previous=previous, kind=kind or inputs.kind, sampled=sampled)
