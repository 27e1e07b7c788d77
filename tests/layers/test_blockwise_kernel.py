"""The blockwise (flash-style) kernel against the reference dot_product kernel.

Each case runs both kernels on the same inputs under one jax.jit and compares
the outputs and the gradients of sum(out * cotangent) w.r.t. q, k, v and,
where present, the sinks, the bias and a relative-bias table closed over by
a score_mod (which the custom VJP must hoist to return its gradient).
Lengths are not multiples of the block sizes, so every case also exercises
several blocks, padding keys and dropped padding query rows. Tolerances are
relative to the reference's max |value|: 1e-5 in float32, 2e-2 in bfloat16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meshattn.layers import KernelOptions, MaskSpec, dot_product_attention, score_mods
from meshattn.layers.kernels.train.blockwise import BLOCKWISE_FEATURES, blockwise_attention

B, N, H = 2, 4, 8
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


@dataclasses.dataclass(frozen=True)
class Case:
  kv_heads: int = 2
  attention_type: str = "global"
  q_len: int = 20
  kv_len: int = 20
  positions: str = "self"  # self | cache (ring buffer, empty slots) | late_keys (rows see nothing)
  segments: bool = False
  soft_cap: float | None = None
  sinks: bool = False
  mask: str | None = None  # head: [B, N, T, S] | shared: [T, S] | empty_rows: [B, 1, T, S]
  bias: str | None = None  # head: [N, T, S] | batch: [B, 1, T, S]
  score_mod: str | None = None  # alibi | relative
  mask_mod: str | None = None  # document | prefix
  dtype: str = "float32"
  float32_logits: bool = False
  block_q: int = 8
  block_kv: int = 8

  @property
  def spec(self):
    kind = self.attention_type
    return MaskSpec(kind, window=5 if kind == "local_sliding" else None,
                    chunk=6 if kind == "chunk" else None)


def make_inputs(case: Case, seed: int = 0):
  """(differentiable arrays, other arrays, output cotangent)."""
  rng = np.random.default_rng(seed)
  t, s, kh = case.q_len, case.kv_len, case.kv_heads
  dtype = jnp.dtype(case.dtype)
  diff = {
      "q": rng.normal(size=(B, t, N, H)), "k": rng.normal(size=(B, s, kh, H)),
      "v": rng.normal(size=(B, s, kh, H))}
  if case.sinks:
    diff["sinks"] = rng.normal(size=N)
  if case.bias == "head":
    diff["bias"] = rng.normal(size=(N, t, s))
  elif case.bias == "batch":
    diff["bias"] = rng.normal(size=(B, 1, t, s))
  if case.score_mod == "relative":
    diff["table"] = rng.normal(size=(N, 9))
  diff = {name: jnp.asarray(x, dtype) for name, x in diff.items()}

  if case.positions == "self":
    q_pos = np.broadcast_to(np.arange(t), (B, t))
    kv_pos = np.broadcast_to(np.arange(s), (B, s))
  elif case.positions == "cache":  # decoding-like queries over a ring buffer with empty slots
    assert s == 20 and t <= 12
    q_pos = np.stack([np.arange(20 - t, 20), np.arange(15 - t, 15)])
    kv_pos = np.stack([rng.permutation(20), np.concatenate([np.arange(16), -np.ones(4, int)])])
  else:  # late_keys: queries 0..5 precede every key, so a causal row sees nothing
    q_pos = np.broadcast_to(np.arange(t), (B, t))
    kv_pos = np.broadcast_to(np.arange(s) + 6, (B, s))
  fixed = {"q_pos": q_pos, "kv_pos": kv_pos}
  if case.segments:
    def segments(length, cut1, cut2):
      return np.concatenate(
          [np.full(cut1, 1), np.full(cut2 - cut1, 2), np.zeros(length - cut2, int)])
    fixed["q_seg"] = np.stack([segments(t, t // 3, t - 4), segments(t, t // 2, t - 3)])
    fixed["kv_seg"] = np.stack([segments(s, s // 3, s - 4), segments(s, s // 2, s - 3)])
  if case.mask == "head":
    fixed["mask"] = rng.random((B, N, t, s)) < 0.8
  elif case.mask == "shared":
    fixed["mask"] = rng.random((t, s)) < 0.7
  elif case.mask == "empty_rows":
    mask = rng.random((B, 1, t, s)) < 0.8
    mask[0, 0, [3, 17]] = False  # two rows that see nothing
    fixed["mask"] = mask
  if case.mask_mod == "document":
    fixed["doc_ids"] = np.array([[0] * 5 + [1] * 10 + [2] * 5, [0] * 9 + [1] * 11])
  elif case.mask_mod == "prefix":
    fixed["prefix"] = np.array([6, 11])
  fixed = {name: jnp.asarray(x, jnp.bool_ if x.dtype == bool else jnp.int32)
           for name, x in fixed.items()}
  cot = jnp.asarray(rng.normal(size=(B, t, N, H)), jnp.float32)
  return diff, fixed, cot


def attend(kernel, case: Case, diff, fixed):
  score_mod = mask_mod = None
  if case.score_mod == "alibi":
    score_mod = score_mods.alibi(N)
  elif case.score_mod == "relative":
    score_mod = score_mods.relative_bias(diff["table"], 4)
  if case.mask_mod == "document":
    mask_mod = score_mods.document_mask(fixed["doc_ids"])
  elif case.mask_mod == "prefix":
    mask_mod = score_mods.prefix_lm(fixed["prefix"])
  options = KernelOptions(mask=case.spec, scale=0.37, soft_cap=case.soft_cap,
                          float32_logits=case.float32_logits, score_mod=score_mod,
                          mask_mod=mask_mod)
  out, weights = kernel(
      diff["q"], diff["k"], diff["v"], options=options, q_positions=fixed["q_pos"],
      kv_positions=fixed["kv_pos"], q_segment_ids=fixed.get("q_seg"),
      kv_segment_ids=fixed.get("kv_seg"), sinks=diff.get("sinks"), mask=fixed.get("mask"),
      bias=diff.get("bias"))
  assert weights is None
  return out


@functools.lru_cache(maxsize=None)
def run_both(case: Case, seed: int = 0):
  """{kernel: (output, gradients)} for both kernels, compiled (and run) once per case."""
  diff, fixed, cot = make_inputs(case, seed)
  blockwise = functools.partial(blockwise_attention, block_q=case.block_q, block_kv=case.block_kv)

  @jax.jit
  def both(diff, fixed, cot):
    result = {}
    for name, kernel in (("ref", dot_product_attention), ("blk", blockwise)):
      def loss(d):
        out = attend(kernel, case, d, fixed)
        return jnp.sum(out.astype(jnp.float32) * cot), out
      grads, out = jax.grad(loss, has_aux=True)(diff)
      result[name] = (out, grads)
    return result

  return both(diff, fixed, cot)


def rel_err(got, want):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  want = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
  assert got.shape == want.shape
  assert np.all(np.isfinite(got))
  scale = np.max(np.abs(want))
  assert scale > 0, "the reference is all zeros: the comparison would prove nothing"
  return np.max(np.abs(got - want)) / scale


def check(case: Case, seed: int = 0):
  result = run_both(case, seed)
  (ref_out, ref_grads), (out, grads) = result["ref"], result["blk"]
  assert out.dtype == ref_out.dtype and out.shape == (B, case.q_len, N, H)
  tol = TOL[case.dtype]
  errors = {"out": rel_err(out, ref_out)}
  assert set(grads) == set(ref_grads)
  for name in ref_grads:
    assert grads[name].dtype == ref_grads[name].dtype, name
    errors["d" + name] = rel_err(grads[name], ref_grads[name])
  print(f"\n{case}: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
  bad = {name: err for name, err in errors.items() if not err <= tol}
  assert not bad, f"errors above {tol}: {bad}"
  return result


@pytest.mark.parametrize("attention_type", ["global", "local_sliding", "chunk", "full"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_every_mask_and_head_layout(kv_heads, attention_type):
  """All features at once; block_q != block_kv so the two tilings differ."""
  check(Case(kv_heads=kv_heads, attention_type=attention_type, segments=True, soft_cap=1.5,
             sinks=True, mask="head", bias="head", block_q=8, block_kv=6))


FEATURE_CASES = {
    "plain": Case(),
    "one_block": Case(block_q=512, block_kv=512),
    "segments": Case(segments=True),
    "soft_cap": Case(soft_cap=1.2),
    "sinks": Case(sinks=True),
    "mask_shared": Case(mask="shared", attention_type="full"),
    "bias_batch": Case(bias="batch"),
    "cross_cache": Case(q_len=12, kv_len=20, positions="cache", sinks=True, bias="head"),
    "cross_cache_window": Case(q_len=7, kv_len=20, positions="cache",
                               attention_type="local_sliding", block_q=4, block_kv=6),
    "prefix_lm": Case(attention_type="full", mask_mod="prefix"),
    "document": Case(mask_mod="document", segments=True),
    "empty_rows": Case(positions="late_keys", mask="empty_rows"),
    "empty_rows_sinks": Case(positions="late_keys", mask="empty_rows", sinks=True, soft_cap=2.0),
    "bf16": Case(dtype="bfloat16", segments=True, soft_cap=1.5, sinks=True, mask="head",
                 bias="head", attention_type="local_sliding"),
    "bf16_f32_logits": Case(dtype="bfloat16", float32_logits=True, score_mod="relative",
                            mask_mod="document", sinks=True),
}


def empty_rows_are_zero_with_finite_gradients(case, blk):
  """Rows with no visible key: exactly zero output, finite (zero) gradients."""
  out, grads = blk
  out = np.asarray(out)
  assert np.all(out[:, :6] == 0)  # positions 0..5 precede every key
  assert np.all(out[0, [3, 17]] == 0)  # all-False user-mask rows
  assert np.abs(out[:, 6:]).max() > 0
  for g in grads.values():
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads["q"])[:, :6] == 0)


def segment_padding_rows_are_zero(case, blk):
  out, grads = blk
  _, fixed, _ = make_inputs(case)
  pad = np.asarray(fixed["q_seg"]) == 0  # [B, T]
  assert pad.any()
  assert np.all(np.asarray(out)[pad] == 0)
  assert np.all(np.asarray(grads["q"])[pad] == 0)


# Checks on a feature case's blockwise result, run inside that case's test_features so they
# reuse its compile (as separate tests, under xdist, they could land on the other worker and
# compile and run the case a second time).
RESULT_CHECKS = {"empty_rows": empty_rows_are_zero_with_finite_gradients,
                 "segments": segment_padding_rows_are_zero}


@pytest.mark.parametrize("name", list(FEATURE_CASES))
def test_features(name):
  result = check(FEATURE_CASES[name])
  if name in RESULT_CHECKS:
    RESULT_CHECKS[name](FEATURE_CASES[name], result["blk"])


@pytest.mark.parametrize("score_mod", ["alibi", "relative"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_score_mods(kv_heads, score_mod):
  """score_mod sees the query head index n = k * G + g; d(table) flows through the hook."""
  result = check(Case(kv_heads=kv_heads, score_mod=score_mod, soft_cap=2.0, bias="head",
                      mask_mod="document" if kv_heads == 1 else None))
  if score_mod == "relative":
    assert "table" in result["blk"][1]


def test_logit_memory_is_blockwise():
  """No intermediate of the forward + backward holds a [T, S]-sized logit matrix."""
  t = s = 64
  case = Case(q_len=t, kv_len=s, sinks=True, soft_cap=1.5, segments=True, score_mod="relative")
  diff, fixed, cot = make_inputs(case)
  blockwise = functools.partial(blockwise_attention, block_q=8, block_kv=8)
  loss = lambda d: jnp.sum(attend(blockwise, case, d, fixed) * cot)
  jaxpr = jax.make_jaxpr(jax.grad(loss))(diff)

  def sizes(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        yield int(np.prod(var.aval.shape))
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (tuple, list)) else (param,)):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            yield from sizes(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            yield from sizes(sub)

  largest = max(sizes(jaxpr.jaxpr))
  logits = B * N * t * s
  assert largest <= B * t * N * H, (largest, logits)  # the size of q: nothing quadratic


def test_unsupported_requests_raise():
  diff, fixed, _ = make_inputs(Case())
  call = functools.partial(blockwise_attention, diff["q"], diff["k"], diff["v"],
                           q_positions=fixed["q_pos"], kv_positions=fixed["kv_pos"])
  with pytest.raises(ValueError, match="dropout"):
    call(options=KernelOptions(dropout_rate=0.1), deterministic=False,
         dropout_rng=jax.random.key(0))
  with pytest.raises(ValueError, match="weights"):
    call(options=KernelOptions(), return_weights=True)
  # Dropout configured but deterministic (evaluation): plain attention.
  out, _ = call(options=KernelOptions(dropout_rate=0.1), deterministic=True)
  ref, _ = dot_product_attention(diff["q"], diff["k"], diff["v"], options=KernelOptions(),
                                 q_positions=fixed["q_pos"], kv_positions=fixed["kv_pos"])
  assert rel_err(out, ref) <= 1e-5


def test_features_constant():
  assert BLOCKWISE_FEATURES == frozenset({
      "gqa", "causal", "full", "window", "chunk", "segment_ids", "soft_cap", "sinks", "user_mask",
      "user_bias", "score_mod", "mask_mod", "backward"})
