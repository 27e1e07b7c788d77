"""The output gate of Gated Attention (attnax's LITE; Qwen3-Next, "Gated Attention for LLMs", 2025).

The attention context of every query head is multiplied by a gate computed
from the layer's own input x, before the output projection:

    elementwise:  context[b, t, n, h] *= sigmoid(x[b, t] . W[:, n, h])   W [D, N, H]
    headwise:     context[b, t, n, h] *= sigmoid(x[b, t] . W[:, n])      W [D, N]

The gate lets a head output (close to) nothing where attention has nothing
useful to add, which removes the "attention sink" on the first token and the
massive activations it causes, and adds a non-linearity between the value and
output projections. It is applied outside the kernel, so it composes with
every kernel and mode (train, prefill, decode, every cache) and with sinks,
soft cap, windows and linear attention: the kernel's output is the same, only
what leaves the layer changes.

The parameter is `gate.kernel` ([D, N, H] or [D, N]) with the query
projection's logical axes, so it is sharded like `query.kernel`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from meshattn.configs.vocabulary import OUTPUT_GATES
from meshattn.layers.projections import DenseGeneral, default_kernel_init


class OutputGate(DenseGeneral):
  """sigmoid(x W) times the attention context, per head and channel or per head."""

  def __init__(self, emb_dim: int, num_heads: int, head_dim: int, *, kind: str = "elementwise",
               rngs: nnx.Rngs, kernel_init=default_kernel_init, dtype=None,
               weight_dtype=jnp.float32, precision=None, dot_general=None):
    if kind not in OUTPUT_GATES[1:]:
      raise ValueError(f"attention_output_gate={kind!r}: allowed {list(OUTPUT_GATES)} "
                       "('none' builds no gate)")
    self.kind = kind
    out_shape = (num_heads, head_dim) if kind == "elementwise" else (num_heads,)
    axes = ("embed", "q_heads", "kv_head_dim")[:1 + len(out_shape)]
    super().__init__((emb_dim,), out_shape, kernel_axes=axes, rngs=rngs, kernel_init=kernel_init,
                     dtype=dtype, weight_dtype=weight_dtype, precision=precision,
                     dot_general=dot_general)

  def __call__(self, inputs: jax.Array, context: jax.Array) -> jax.Array:
    """inputs [B, T, D] (the layer input the queries were projected from), context
    [B, T, N, H] -> the gated context [B, T, N, H] in context's dtype."""
    logits = super().__call__(inputs)  # [B, T, N, H] or [B, T, N]
    gate = jax.nn.sigmoid(logits.astype(jnp.float32))
    if self.kind == "headwise":
      gate = gate[..., None]  # [B, T, N, 1]
    return (context.astype(jnp.float32) * gate).astype(context.dtype)  # [B, T, N, H]


def make_output_gate(kind: str, emb_dim: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs,
                     **dense) -> OutputGate | None:
  """The layer's gate for `attention_output_gate` (None for 'none'), built with the query
  projection's DenseGeneral keywords; the gate has no bias, so use_bias / bias_init are
  not used."""
  if kind == "none":
    return None
  dense = {k: v for k, v in dense.items() if k not in ("use_bias", "bias_init")}
  return OutputGate(emb_dim, num_heads, head_dim, kind=kind, rngs=rngs, **dense)
