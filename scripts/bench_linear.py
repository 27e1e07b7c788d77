"""Linear-attention section of scripts/bench.py (issue 18).

  linear fwd+bwd  causal linear attention (chunkwise-parallel, per chunk size)
                  against the registry's `flash` causal kernel at the same
                  shape in the same run (default b1 s65536 n32 k8 h128 bf16):
                  ms, Mtok/s and the speed-up over flash (target >= 4x);
  linear decode   one token per sequence: the recurrent step over the state
                  cache vs softmax decode over a KV cache (ragged kernel and
                  jax.nn), at kv lengths 4096 and 65536 side by side: the
                  linear step reads the same state whatever the length.

--check compares linear attention with the float32 quadratic form on the
first --max-reference-seq tokens (causal: a prefix's outputs depend on the
prefix only) and the decode step (at the first decode length; it is the same
program at every length) with the chunkwise form's last token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from meshattn.layers.linear import LinearSpec, LinearState, linear_attention
from meshattn.layers.linear import linear_attention_step
from meshattn.scripts.bench_common import TOLERANCE, Row, failed, rel_err, time_fn

DECAY = (0.99,)  # one gamma for every head (lightning / RetNet style)


def _spec(chunk: int) -> LinearSpec:
  return LinearSpec(chunk_size=chunk, feature_map="elu_plus_one", decay=DECAY, normalize=True)


def quadratic_reference(q, k, v, spec: LinearSpec, scale: float):
  """The masked quadratic form in float32, one head at a time: [B, T, N, H]."""
  b, t, n, h = q.shape
  group = n // k.shape[2]
  gamma = spec.decay[0] if spec.decay else 1.0
  i = jnp.arange(t)
  distance = (i[:, None] - i[None, :]).astype(jnp.float32)  # [T, T]
  decay = jnp.where(distance >= 0, gamma ** jnp.maximum(distance, 0.0), 0.0)  # [T, T]

  def head(n_idx):
    fq = spec.features(q[:, :, n_idx]) * scale  # [B, T, H]
    kv = n_idx // group
    fk = spec.features(k[:, :, kv])  # [B, T, H]
    w = jnp.einsum("bth,bsh->bts", fq, fk) * decay  # [B, T, T]
    out = jnp.einsum("bts,bsh->bth", w, v[:, :, kv].astype(jnp.float32))
    return out / w.sum(-1, keepdims=True) if spec.normalize else out

  return jnp.moveaxis(jax.lax.map(head, jnp.arange(n)), 0, 2)  # [B, T, N, H]


def bench_linear_train(args, platform: str) -> list[Row]:
  """Forward+backward of linear attention (several chunk sizes) and of flash causal."""
  from meshattn.scripts.bench_prefill import _inputs, _ours
  b, t = args.linear_train
  (q, k, v), cot, _, shape = _inputs(b, t, args)  # the prefill section's q, k, v, cotangent
  scale = args.head_dim ** -0.5
  candidates = {}
  flash = _ours("flash", platform, {"causal", "gqa"}, args)
  name = "flash causal"
  if flash is None:  # CPU: no flash kernel; the autoselected one stands in
    flash, name = _ours("autoselected", platform, {"causal", "gqa"}, args), "autoselected causal"
  candidates[name] = (flash[1], None)
  for chunk in args.linear_chunks:
    spec = _spec(chunk)
    candidates[f"linear (chunk {chunk})"] = (
        lambda q, k, v, spec=spec: linear_attention(q, k, v, spec=spec, scale=scale)[0], spec)
  reference = None
  prefix = min(t, args.max_reference_seq)
  if args.check:
    reference = jax.jit(lambda q, k, v: quadratic_reference(q, k, v, _spec(1), scale))(
        q[:, :prefix], k[:, :prefix], v[:, :prefix])
  rows = []
  for label, (fn, spec) in candidates.items():
    grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum((fn(q, k, v) * cot).astype(jnp.float32)),
                            argnums=(0, 1, 2)))
    err, status = None, "ok"
    try:
      if reference is not None and spec is not None:
        err = rel_err(jax.jit(fn)(q, k, v)[:, :prefix], reference)
        status = "ok" if err <= TOLERANCE[args.dtype] else "MISMATCH"
      ms = time_fn(grad, q, k, v, iters=args.iters) if status == "ok" else None
      rate = None if ms is None else b * t / (ms * 1e-3) / 1e6
      rows.append(Row("linear fwd+bwd", label, shape, ms, rate, "Mtok/s", status=status,
                      max_err=err))
    except Exception as error:  # e.g. out of memory
      rows.append(Row("linear fwd+bwd", label, shape, None, None, "Mtok/s", status=failed(error)))
  base = rows[0].ms
  for row in rows:
    if row.ms and base:
      row.ratio = base / row.ms  # speed-up over flash
  return rows


def bench_linear_decode(args, platform: str) -> list[Row]:
  """One decode step: linear (state) vs softmax (KV cache) at each kv length."""
  from meshattn.scripts.bench import decode_kernels
  dtype = jnp.dtype(args.dtype)
  n, kv_heads, h = args.heads, args.kv_heads, args.head_dim
  spec = _spec(64)
  scale = h ** -0.5
  softmax = {name: fn for name, (fn, paged) in decode_kernels(platform).items()
             if not paged and name in ("ragged (pallas)", "jax.nn cudnn", "ragged (reference)")}
  # The step's shapes do not depend on the kv length: one compile serves every row.
  step = jax.jit(lambda q, k, v, kv, norm: linear_attention_step(
      q, k, v, LinearState(kv, norm), spec=spec, scale=scale))
  # Tokens [0, s) with `valid` marking which count: the state after the first s - 1 and the
  # whole pass's last output come from one compile.
  prefix_pass = jax.jit(lambda q, k, v, valid: linear_attention(q, k, v, spec=spec, scale=scale,
                                                               valid=valid))
  rows = []
  for i, (b, s) in enumerate(args.linear_decode):
    keys = jax.random.split(jax.random.key(1), 7)
    q = jax.random.normal(keys[0], (b, n, h), dtype)  # [B, N, H]
    k_new = jax.random.normal(keys[1], (b, kv_heads, h), dtype)  # [B, K, H]
    v_new = jax.random.normal(keys[2], (b, kv_heads, h), dtype)  # [B, K, H]
    state = LinearState(jax.random.uniform(keys[3], (b, kv_heads, h, h), jnp.float32),
                        jax.random.uniform(keys[4], (b, kv_heads, h), jnp.float32))
    shape = f"b{b} kv{s}"
    state_bytes = state.kv.size * 4 + state.norm.size * 4
    try:
      err, status = None, "ok"
      if args.check and i == 0:  # the step is the same program at every length
        # The step after a prefix of s - 1 tokens == the chunkwise form's last token.
        kk = jax.random.normal(keys[5], (b, s, kv_heads, h), dtype)
        qq = jnp.concatenate([jnp.zeros((b, s - 1, n, h), dtype), q[:, None]], axis=1)
        kk = kk.at[:, -1].set(k_new)
        vv = jax.random.normal(keys[6], kk.shape, dtype).at[:, -1].set(v_new)
        everything = jnp.ones((b, s), bool)
        _, state0 = prefix_pass(qq, kk, vv, everything.at[:, -1].set(False))
        whole = prefix_pass(qq, kk, vv, everything)[0]
        err = rel_err(step(q, k_new, v_new, state0.kv, state0.norm)[0], whole[:, -1])
        status = "ok" if err <= TOLERANCE[args.dtype] else "MISMATCH"
      ms = (time_fn(step, q, k_new, v_new, state.kv, state.norm, iters=args.decode_iters)
            if status == "ok" else None)
      rows.append(Row("linear decode", "linear step (state)", shape, ms,
                      None if ms is None else state_bytes / (ms * 1e-3) / 1e9, "GB/s",
                      status=status, max_err=err))
    except Exception as error:
      rows.append(Row("linear decode", "linear step (state)", shape, None, None, "GB/s",
                      status=failed(error)))
    kk = jax.random.normal(keys[5], (b, s, kv_heads, h), dtype)  # [B, S, K, H]
    lengths = jnp.full((b,), s, jnp.int32)
    kv_bytes = 2 * kk.size * dtype.itemsize
    for name, fn in softmax.items():
      try:
        ms = time_fn(jax.jit(fn), q, kk, kk, lengths, None, iters=args.decode_iters)
        rows.append(Row("linear decode", f"softmax {name}", shape, ms,
                        kv_bytes / (ms * 1e-3) / 1e9, "GB/s"))
      except Exception as error:
        rows.append(Row("linear decode", f"softmax {name}", shape, None, None, "GB/s",
                        status=failed(error)))
    del kk
  linear_ms = {r.shape: r.ms for r in rows if r.kernel.startswith("linear") and r.ms}
  for row in rows:
    if row.ms and linear_ms.get(row.shape):
      row.ratio = row.ms / linear_ms[row.shape]  # how many times the linear step's time
  return rows


def bench_linear(args, platform: str) -> list[Row]:
  return bench_linear_train(args, platform) + bench_linear_decode(args, platform)
