"""What one linear-attention layer computes: `LinearSpec` and the feature maps.

Causal linear attention replaces softmax(q k^T) with phi(q) phi(k)^T for a
feature map phi, optionally decayed per kv head (gamma in (0, 1], RetNet /
lightning attention: key s reaches query t with weight gamma^(t - s)) and
optionally normalized by the same weights over phi(q) phi(k):

    out_t = sum_{s <= t} gamma^(t-s) (phi(q_t) . phi(k_s)) v_s
            [ / sum_{s <= t} gamma^(t-s) (phi(q_t) . phi(k_s)) ]

so a layer carries a state of fixed size [kv_heads, head_dim, head_dim]
(plus a normalizer [kv_heads, head_dim]) instead of a growing KV cache.
The spec is static (hashable) so layers can keep it in their settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from meshattn.configs import vocabulary as vocab

# Feature maps phi (applied to queries and keys after RoPE and QK norm), by the names
# of vocab.LINEAR_FEATURE_MAPS. Positive maps (elu + 1, relu) keep the normalizer's
# denominator > 0; the identity map may give a zero or negative one, so it runs
# without the normalizer (vocab.linear_normalize_problem).
FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "elu_plus_one": lambda x: jax.nn.elu(x) + 1.0,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,  # lightning attention (MiniMax-01) runs its q / k through SiLU
    "identity": lambda x: x,
}
assert tuple(FEATURE_MAPS) == vocab.LINEAR_FEATURE_MAPS
POSITIVE_FEATURE_MAPS = vocab.POSITIVE_FEATURE_MAPS


@dataclasses.dataclass(frozen=True)
class LinearSpec:
  """One linear-attention layer's computation (see the module doc).

  chunk_size: tokens per chunk of the chunkwise-parallel form (train and
    prefill): quadratic inside a chunk, through the running state between
    chunks. Any length works (the last chunk is padded with invisible tokens).
  feature_map: a key of FEATURE_MAPS, or (Python keyword path only) a callable
    phi(x) -> array of x's shape, applied elementwise-per-token to q and k in float32:
    with `normalize`, phi must be positive (the denominator is not checked).
  decay: () for none (gamma = 1), one gamma for every kv head, or one per kv
    head; each in (0, 1].
  normalize: divide by the decayed sum of phi(q) . phi(k) (needs a positive
    feature map).
  """

  chunk_size: int = 128  # H200, s65536 h128: 64 / 128 / 256 took 43 / 31 / 27 ms fwd+bwd
  feature_map: str | Callable[[jax.Array], jax.Array] = "elu_plus_one"
  decay: tuple[float, ...] = ()
  normalize: bool = True

  def __post_init__(self):
    if isinstance(self.decay, (int, float)):  # one gamma; 0 means none, as in a config
      object.__setattr__(self, "decay", () if self.decay == 0 else (float(self.decay),))
    else:
      object.__setattr__(self, "decay", tuple(float(g) for g in self.decay))
    if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) \
        or self.chunk_size < 1:
      raise ValueError(f"linear_attention_chunk_size={self.chunk_size!r}: must be an integer >= 1")
    custom = callable(self.feature_map)
    if not custom and self.feature_map not in FEATURE_MAPS:
      raise ValueError(f"linear_feature_map={self.feature_map!r}: allowed {list(FEATURE_MAPS)} "
                       "(or a callable phi(x), given as LinearSpec(feature_map=...))")
    problem = vocab.linear_decay_problem(self.decay)
    if problem:
      raise ValueError(f"linear_decay={list(self.decay)}: {problem} (or () / 0 for no decay)")
    # A callable's sign is the caller's to promise (documented above); a named map's is known.
    problem = None if custom else vocab.linear_normalize_problem(self.normalize, self.feature_map)
    if problem:
      raise ValueError(f"linear_normalize=True {problem}")

  def check_heads(self, num_kv_heads: int) -> None:
    """A per-head decay needs one gamma per kv head (the state is per kv head)."""
    problem = vocab.linear_heads_problem(self.decay, num_kv_heads)
    if problem:
      raise ValueError(f"linear_decay {problem}")

  def log_decay(self, num_kv_heads: int) -> jax.Array | None:
    """log(gamma) per kv head [K] float32, or None without decay."""
    if not self.decay:
      return None
    self.check_heads(num_kv_heads)
    gammas = self.decay * num_kv_heads if len(self.decay) == 1 else self.decay
    return jnp.log(jnp.asarray(gammas, jnp.float32))  # [K]

  def features(self, x: jax.Array) -> jax.Array:
    """phi(x) in float32 (the state accumulates in float32 whatever the activations' dtype)."""
    phi = self.feature_map if callable(self.feature_map) else FEATURE_MAPS[self.feature_map]
    features = phi(x.astype(jnp.float32))
    if features.shape != x.shape:
      raise ValueError(f"linear feature_map {phi!r} must keep the shape {x.shape} of its input, "
                       f"got {features.shape}")
    return features.astype(jnp.float32)


def decay_powers(log_decay: jax.Array | None, distance: jax.Array, visible: jax.Array,
                 kv_axis: int) -> jax.Array:
  """gamma^distance where visible, else 0 (selected, never inf * 0), float32.

  distance and visible broadcast together; the result has a kv-head axis
  inserted at `kv_axis` (negative, counted from the end): log_decay [K]
  there, or size 1 without decay (then visible as 0 / 1).
  """
  visible = jnp.expand_dims(visible, kv_axis)
  if log_decay is None:
    return visible.astype(jnp.float32)
  safe = jnp.expand_dims(jnp.where(jnp.squeeze(visible, kv_axis), distance, 0), kv_axis)
  shape = [1] * (-kv_axis)
  shape[0] = log_decay.shape[0]
  gamma_d = jnp.exp(safe.astype(jnp.float32) * log_decay.reshape(shape))
  return jnp.where(visible, gamma_d, 0.0)


def check_linear_layer(spec: LinearSpec, *, num_kv_heads: int, mask_type: str,
                       attention_sink: bool, soft_cap, score_mod, mask_mod, attention_fn,
                       dropout_rate: float) -> None:
  """Raise ValueError naming what a linear-attention layer cannot do (softmax features it
  would otherwise drop silently)."""
  spec.check_heads(num_kv_heads)
  refused = {"attention_sink": attention_sink, "attn_logits_soft_cap": soft_cap is not None,
             "score_mod": score_mod is not None, "mask_mod": mask_mod is not None,
             "attention_fn": attention_fn is not None, "dropout_rate > 0": dropout_rate > 0,
             f"mask attention_type={mask_type!r} (linear layers are causal)": mask_type != "global"}
  bad = [name for name, on in refused.items() if on]
  if bad:
    raise ValueError(f"attention_type='linear' (linear attention) does not take {bad}: they act "
                     "on softmax logits or weights, which a linear layer has none of")
