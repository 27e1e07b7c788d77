"""A decoder-only language model made of the Attention layer, built from a config.

    cfg = load_config("tiny-lm")
    mesh = create_mesh(cfg)
    model = Decoder(cfg, mesh=mesh, rngs=nnx.Rngs(0))
    shard_module(model, mesh, model.rules)        # or sharding.create_sharded(...)
    logits = model(tokens, positions, segment_ids)  # tokens [B, T] int -> [B, T, vocab] float32

    model.init_cache(batch_size, max_length)      # one KV cache per block
    logits = model(prompts, segment_ids=real, model_mode="prefill")      # right-padded prompts
    logits = model(next_tokens, model_mode="autoregressive")             # [B, 1]

Structure: token embedding [vocab, emb_dim] -> `num_decoder_layers` blocks of
[RMSNorm, Attention(layer_idx=i), RMSNorm, gated MLP] with residuals
(layers/decoder_block.py) -> RMSNorm -> logits, tied to the embedding
(x @ E^T / sqrt(emb_dim), `logits_via_embedding`) or a separate `logits`
projection. Every parameter carries logical names (`vocab`, `embed`, `mlp`,
the layer's `q_heads` / `kv_heads`, `norm`), every activation is constrained
by the mode's names (`activation_vocab` for the logits).

Modes are the layer's: `train` (packed rows: `positions` restart at 0 per
sequence, `segment_ids` separate them, 0 is padding), `prefill` and
`autoregressive` (each block's KV cache; `slots` picks the cache slot of each
row, as in `Attention`). In train mode `remat_policy` recomputes each block
in the backward pass, saving the tensors its policy names: the layer's
`query_proj`, `key_proj`, `value_proj`, `context`, `out_proj` and the MLP's
`mlpwi`, `mlpwo` checkpoints.

The parameter tree (`nnx.state(model, nnx.Param)`) is the checkpoint format:
`embedding`, `blocks.<i>.{attention, pre_attention_norm, pre_mlp_norm, mlp}`,
`final_norm`, and `logits` when untied.
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from flax import nnx

from meshattn.configs.validation import REMAT_POLICIES
from meshattn.configs.vocabulary import token_range_problem
from meshattn.kvcache.graph_epoch import TrackedList, TracksGraph
from meshattn.layers.cache_builder import init_caches
from meshattn.layers.decoder_block import DecoderBlock
from meshattn.layers.mlp import model_norm
from meshattn.layers.projections import DenseGeneral
from meshattn.layers.settings import MODEL_MODES
from meshattn.layers.step_inputs import joint_verdict, plan_model_step
from meshattn.sharding import constrain

# What each remat policy saves for the backward pass (everything else in the block is
# recomputed); "none" runs without remat, "full" saves only the block inputs.
_SAVED_NAMES = {
    "minimal": ("query_proj", "key_proj", "value_proj", "context", "out_proj", "mlpwi", "mlpwo"),
    "save_qkv_proj": ("query_proj", "key_proj", "value_proj"),
    "save_out_proj": ("out_proj",),
    "save_dot_except_mlp": ("query_proj", "key_proj", "value_proj", "context", "out_proj"),
}
assert set(REMAT_POLICIES) == {"none", "full", *_SAVED_NAMES}  # the allowed values live in configs


def remat_policy(name: str):
  """The jax.checkpoint policy of `remat_policy` (None for "none" and "full")."""
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={name!r}: allowed {list(REMAT_POLICIES)}")
  if name in ("none", "full"):
    return None
  return jax.checkpoint_policies.save_only_these_names(*_SAVED_NAMES[name])


class Decoder(TracksGraph, nnx.Module):
  """Token ids [B, T] -> logits [B, T, vocab_size] (float32) through the Attention layer."""

  def __init__(self, config, *, mesh: jax.sharding.Mesh | None = None, rngs: nnx.Rngs):
    self.config = config
    self.mesh = mesh
    self.remat = config.remat_policy
    remat_policy(self.remat)  # an unknown policy fails here, not in the first train step
    self.blocks = TrackedList([DecoderBlock(config, layer_idx=i, mesh=mesh, rngs=rngs)
                            for i in range(config.num_decoder_layers)])
    s = self.blocks[0].attention.settings
    self.rules = s.logical_axis_rules
    self.dtype = s.dtype
    vocab, d = config.vocab_size, s.emb_dim
    # Unit-variance embeddings: the block's RMSNorm sees O(1) inputs at any width.
    table = jax.random.normal(rngs.params(), (vocab, d), s.weight_dtype)  # [V, D]
    self.embedding = nnx.Param(table, logical_axes=("vocab", "embed"))
    self.final_norm = model_norm(d, epsilon=s.normalization_layer_epsilon, dtype=s.dtype,
                                 weight_dtype=s.weight_dtype)
    self.logits = None if config.logits_via_embedding else DenseGeneral(
        (d,), (vocab,), kernel_axes=("embed", "vocab"), rngs=rngs, dtype=s.dtype,
        weight_dtype=s.weight_dtype, precision=s.precision)

  # ---- caches ------------------------------------------------------------------

  def init_cache(self, batch_size: int, max_length: int | None = None, *,
                 paged: bool | None = None) -> list:
    """One KV cache per block (`Attention.init_cache`), `batch_size` slots of up to
    `max_length` tokens (default max_target_length); `paged` (default paged_kv_cache)
    builds paged caches, each with its own page pool. Returns `caches()`.

    Every block's cache is built before any is kept, so an error in one (a hybrid
    model's softmax layer refusing what its linear layers took) leaves every block's
    cache as it was."""
    init_caches([block.attention for block in self.blocks], batch_size, max_length, paged=paged)
    return self.caches()

  def caches(self) -> list:
    """Each block's cache, in layer order (None before init_cache): reserve pages, reset or
    free a slot in every one of them."""
    return [block.attention.cache for block in self.blocks]

  # ---- call --------------------------------------------------------------------

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, *, model_mode: str = "train",
               slots: jax.Array | None = None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Logits [B, T, vocab_size] in float32 for token ids [B, T].

    positions [B, T]: RoPE positions (train default 0..T-1; cached modes default to each
      slot's length). segment_ids [B, T]: train, packed sequences (0 = padding); prefill,
      nonzero marks real tokens of right-padded prompts. slots [B]: cache slot of each row
      (cached modes). rngs: dropout stream when deterministic=False and dropout_rate > 0.
    """
    if model_mode not in MODEL_MODES:
      raise ValueError(f"model_mode={model_mode!r}: allowed {MODEL_MODES}")
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integer ids [batch, length], got {tokens.dtype} "
                       f"{tokens.shape}")
    if model_mode == "autoregressive" and tokens.shape[1] != 1:
      raise ValueError(f"model_mode='autoregressive' takes one token per row, tokens [batch, 1]; "
                       f"got {tokens.shape}")
    _check_token_range(tokens, self.config.vocab_size)
    axes = self.blocks[0].attention.settings.axes[model_mode].inputs  # [batch, length, embed]
    # A lookup in a sharded table by batch-sharded ids makes the SPMD partitioner replicate
    # the result and re-split it; gathering the table first (as FSDP gathers every weight)
    # keeps the lookup local to each batch shard.
    table = self._constrain(self.embedding[...], (None, None))  # [V, D]
    x = jnp.take(table, tokens, axis=0).astype(self.dtype)  # [B, T, D]
    x = self._constrain(x, axes)
    run = _bind_block(model_mode, slots, deterministic)
    if model_mode == "train" and self.remat != "none":
      run = _rematerialized(run, remat_policy(self.remat))
    # One dropout key per block, drawn here: an Rngs stream cannot advance inside remat.
    keys = [None if rngs is None else rngs.dropout() for _ in self.blocks]
    verdict = contextlib.nullcontext()
    if model_mode != "train":
      # Every layer's cache is checked first: a step one layer refuses writes in none.
      layers = [block.attention for block in self.blocks]
      verdict = joint_verdict(plan_model_step(layers, x, segment_ids, slots, model_mode))
    with verdict:
      for block, key in zip(self.blocks, keys):
        x = run(block, x, positions, segment_ids, key)  # [B, T, D]
    y = self.final_norm(x)  # [B, T, D]
    if self.logits is None:
      d = y.shape[-1]
      table = self.embedding[...].astype(self.dtype)  # [V, D]
      logits = jnp.einsum("BTD,VD->BTV", y, table, preferred_element_type=jnp.float32)
      logits = logits / math.sqrt(d)  # [B, T, V]
    else:
      logits = self.logits(y).astype(jnp.float32)  # [B, T, V]
    return self._constrain(logits, (axes[0], axes[1], "activation_vocab"))

  def _constrain(self, x: jax.Array, names) -> jax.Array:
    return constrain(x, names, self.mesh, self.rules)


def _bind_block(model_mode: str, slots, deterministic: bool):
  """block(x, positions, segment_ids, dropout_key) with the Python-valued arguments bound
  (what jax.checkpoint traces is then only arrays and modules)."""

  def run(block, x, positions, segment_ids, dropout_key):
    rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
    return block(x, positions, segment_ids, model_mode=model_mode, slots=slots,
                 deterministic=deterministic, rngs=rngs)

  return run


def _rematerialized(run, policy):
  """`run` under jax.checkpoint over the block's arrays. The block is split outside and
  merged inside, and its state after the call is dropped: a train-mode block changes no
  state (no cache; dropout keys come in as arguments), and nnx.remat's write-back would
  touch Variables of an outer trace (the dropout stream of a layer built with
  dropout_rate > 0), which NNX refuses."""

  def call(block, x, positions, segment_ids, dropout_key):
    graphdef, state = nnx.split(block)

    def pure(state, x, positions, segment_ids, dropout_key):
      return run(nnx.merge(graphdef, state), x, positions, segment_ids, dropout_key)

    return jax.checkpoint(pure, policy=policy)(state, x, positions, segment_ids, dropout_key)

  return call


def _check_token_range(tokens: jax.Array, vocab_size: int) -> None:
  """Ids outside [0, vocab_size) raise when they are concrete (eager calls); under jit they
  cannot be read, and the embedding lookup returns NaN rows for them."""
  if isinstance(tokens, jax.core.Tracer):
    return
  problem = token_range_problem(int(jnp.min(tokens)), int(jnp.max(tokens)), vocab_size)
  if problem:
    raise ValueError(f"tokens must be {problem}")
