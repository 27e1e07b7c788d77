"""The flash kernels (splash for TPU, cuDNN for GPU) against the reference kernel.

Splash runs here on CPU in Pallas TPU interpret mode, so its own forward and
backward kernels (not a reference fallback) are compared with
`dot_product_attention` in float32: outputs and the gradients w.r.t. q, k, v
(and sinks) at 1e-5 of the largest magnitude. Block sizes of 128 on 256-token
sequences make every case cross block boundaries (partial and skipped blocks).
The sweep is a handful of cases, each jitted once (forward and backward in
one program): interpret mode costs seconds per call.

cuDNN needs a GPU: those comparisons skip unless `cudnn_available()`; the
refusals of unsupported features are checked here on CPU, with
jax.nn.dot_product_attention replaced by a function that fails if reached.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.kernel_checks import rel_err, values_and_grads
from meshattn.layers import KernelOptions, MaskSpec, dot_product_attention
from meshattn.layers.kernels.train.flash_gpu import CUDNN_FEATURES, cudnn_attention, cudnn_available
from meshattn.layers.kernels.api import ALL_FEATURES
from meshattn.layers.kernels.train.flash_tpu import (
    SPLASH_FEATURES, default_block_sizes, splash_attention)

B, N, H = 2, 4, 32
BLOCKS_128 = default_block_sizes(128, 128)  # 128 everywhere, also on 256-token sequences
SPLASH_TOL = 1e-5  # measured about 1e-6 (f32 accumulation in another order than the reference)


@pytest.fixture
def on_cpu():
  """Splash runs in Pallas TPU interpret mode on the host CPU on any machine: on a GPU the
  default device would run the float32 dots of both sides in TF32 (1e-3, not 1e-5)."""
  with jax.default_device(jax.devices("cpu")[0]):
    yield


def arange_positions(length: int) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (B, length))  # [B, L]


def make_qkv(rng, q_len, kv_len, kv_heads, dtype=jnp.float32):
  q = jnp.asarray(rng.normal(size=(B, q_len, N, H)), dtype)  # [B, T, N, H]
  k = jnp.asarray(rng.normal(size=(B, kv_len, kv_heads, H)), dtype)  # [B, S, K, H]
  v = jnp.asarray(rng.normal(size=(B, kv_len, kv_heads, H)), dtype)  # [B, S, K, H]
  return q, k, v


def packed_ids(length: int, cuts: list[tuple[int, int]]) -> np.ndarray:
  """[B, length] segment ids: example b is segments of the given sizes, then padding (0)."""
  ids = np.zeros((B, length), np.int32)
  for b, sizes in enumerate(cuts):
    start = 0
    for seg, size in enumerate(sizes, start=1):
      ids[b, start:start + size] = seg
      start += size
  return ids


# ---- Splash vs reference (interpret mode) --------------------------------------------

# (id, kv heads, MaskSpec, q_len, kv_len, extras); extras: soft_cap, sinks,
# segments ("self": one ids array for q and kv; "cross": two arrays), blocks.
SPLASH_CASES = [
    ("mha-causal", 4, MaskSpec("global"), 256, 256, {}),
    ("gqa-window", 2, MaskSpec("local_sliding", window=40), 256, 256, {}),
    ("mqa-chunk", 1, MaskSpec("chunk", chunk=64), 256, 256, {}),
    ("gqa-full-cross-length", 2, MaskSpec("full"), 128, 256, {}),
    ("mha-softcap-default-blocks", 4, MaskSpec("global"), 256, 256,
     {"soft_cap": 2.0, "blocks": None}),
    ("mqa-sinks-window", 1, MaskSpec("local_sliding", window=100), 256, 256, {"sinks": True}),
    ("gqa-segments-causal-sinks", 2, MaskSpec("global"), 256, 256,
     {"segments": "self", "sinks": True}),
    # No sinks here: a sink alone would already zero the rows without keys.
    ("gqa-segments-cross-window", 2, MaskSpec("local_sliding", window=64), 256, 256,
     {"segments": "cross"}),
]


@pytest.mark.parametrize("kv_heads,spec,q_len,kv_len,extras", [case[1:] for case in SPLASH_CASES],
                         ids=[case[0] for case in SPLASH_CASES])
@pytest.mark.usefixtures("on_cpu")
def test_splash_matches_reference(kv_heads, spec, q_len, kv_len, extras):
  rng = np.random.default_rng(0)
  q, k, v = make_qkv(rng, q_len, kv_len, kv_heads)
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.float32)  # [B, T, N, H]
  # Dropout is configured but inactive (deterministic): not a refused feature.
  options = KernelOptions(mask=spec, scale=H**-0.5, soft_cap=extras.get("soft_cap"),
                          dropout_rate=0.1)
  sinks = jnp.asarray(rng.normal(size=N), jnp.float32) if extras.get("sinks") else None  # [N]
  kwargs = dict(options=options, q_positions=arange_positions(q_len),
                kv_positions=arange_positions(kv_len), deterministic=True)
  if extras.get("segments") == "self":
    ids = jnp.asarray(packed_ids(q_len, [(100, 100), (30, 200)]))  # [B, T], padding at the end
    kwargs.update(q_segment_ids=ids, kv_segment_ids=ids)
  elif extras.get("segments") == "cross":
    q_ids = packed_ids(q_len, [(100, 100), (30, 200)])  # [B, T]
    kv_ids = q_ids.copy()  # [B, S]
    # Segment 2 of example 0 keeps only keys 100..119: its queries 183..199
    # (window 64) see no key of their segment and must give zeros.
    kv_ids[0, 120:200] = 0
    kwargs.update(q_segment_ids=jnp.asarray(q_ids), kv_segment_ids=jnp.asarray(kv_ids))

  blocks = extras.get("blocks", BLOCKS_128)
  got, got_grads = values_and_grads(splash_attention, q, k, v, cot, sinks=sinks, interpret=True,
                                    block_sizes=blocks, **kwargs)
  want, want_grads = values_and_grads(dot_product_attention, q, k, v, cot, sinks=sinks, **kwargs)

  assert np.all(np.isfinite(np.asarray(got)))
  assert rel_err(got, want) < SPLASH_TOL
  names = ["dq", "dk", "dv", "dsinks"]
  for name, g, w in zip(names, got_grads, want_grads):
    assert rel_err(g, w) < SPLASH_TOL, name
  if "segments" in extras:
    ids = np.asarray(kwargs["q_segment_ids"])
    assert np.all(np.asarray(got)[ids == 0] == 0)  # padding queries: zeros, as the reference
  if extras.get("segments") == "cross":
    assert np.all(np.asarray(got)[0, 183:200] == 0) and np.any(np.asarray(got)[0, 182] != 0)


def test_splash_feature_set():
  assert SPLASH_FEATURES == {"gqa", "causal", "full", "window", "chunk", "segment_ids", "soft_cap",
                             "sinks", "backward"}
  assert CUDNN_FEATURES == {"gqa", "causal", "full", "window", "user_mask", "user_bias",
                            "backward"}
  assert SPLASH_FEATURES <= ALL_FEATURES and CUDNN_FEATURES <= ALL_FEATURES


# ---- Refusals -------------------------------------------------------------------------


def feature_request(feature: str, q_len: int, kv_len: int):
  """(options, kwargs) of a call needing `feature` and otherwise causal MHA."""
  options = KernelOptions(mask=MaskSpec("global"), scale=H**-0.5)
  kwargs = dict(q_positions=arange_positions(q_len), kv_positions=arange_positions(kv_len))
  if feature == "chunk":
    options = dataclasses.replace(options, mask=MaskSpec("chunk", chunk=64))
  elif feature == "soft_cap":
    options = dataclasses.replace(options, soft_cap=5.0)
  elif feature == "score_mod":
    options = dataclasses.replace(options, score_mod=lambda s, b, h, qi, ki: s)
  elif feature == "mask_mod":
    options = dataclasses.replace(options, mask_mod=lambda b, h, qi, ki: qi >= ki)
  elif feature == "dropout":
    options = dataclasses.replace(options, dropout_rate=0.1)
    kwargs.update(deterministic=False, dropout_rng=jax.random.key(0))
  elif feature == "sinks":
    kwargs.update(sinks=jnp.zeros((N,), jnp.float32))
  elif feature == "user_mask":
    kwargs.update(mask=jnp.ones((B, 1, q_len, kv_len), bool))
  elif feature == "user_bias":
    kwargs.update(bias=jnp.zeros((B, N, q_len, kv_len), jnp.float32))
  elif feature == "weights":
    kwargs.update(return_weights=True)
  elif feature == "segment_ids":
    ids = jnp.ones((B, q_len), jnp.int32)
    kwargs.update(q_segment_ids=ids, kv_segment_ids=ids)
  else:
    raise AssertionError(f"no request for {feature}")
  return options, kwargs


@pytest.mark.parametrize("feature", sorted(ALL_FEATURES - SPLASH_FEATURES))
def test_splash_refuses(feature):
  q, k, v = make_qkv(np.random.default_rng(0), 128, 128, 4)
  options, kwargs = feature_request(feature, 128, 128)
  with pytest.raises(ValueError, match=feature):
    splash_attention(q, k, v, options=options, interpret=True, **kwargs)


@pytest.mark.parametrize("feature", sorted(ALL_FEATURES - CUDNN_FEATURES))
def test_cudnn_refuses_before_any_gpu_call(feature, monkeypatch):
  def unreachable(*args, **kwargs):
    raise AssertionError("jax.nn.dot_product_attention reached")

  monkeypatch.setattr(jax.nn, "dot_product_attention", unreachable)
  q, k, v = make_qkv(np.random.default_rng(0), 128, 128, 4, jnp.bfloat16)
  options, kwargs = feature_request(feature, 128, 128)
  with pytest.raises(ValueError, match=feature):
    cudnn_attention(q, k, v, options=options, **kwargs)


@pytest.mark.parametrize("kernel", ["splash", "cudnn"])
def test_non_index_positions_refused(kernel, monkeypatch):
  monkeypatch.setattr(jax.nn, "dot_product_attention", None)  # must not be reached
  q, k, v = make_qkv(np.random.default_rng(0), 128, 128, 4, jnp.bfloat16)
  options = KernelOptions(mask=MaskSpec("global"), scale=H**-0.5)
  extra = {"interpret": True} if kernel == "splash" else {}
  fn = splash_attention if kernel == "splash" else cudnn_attention
  with pytest.raises(ValueError, match="q_positions"):
    fn(q, k, v, options=options, q_positions=arange_positions(128) + 5,
       kv_positions=arange_positions(128), **extra)


def test_splash_refuses_queries_without_keys():
  q, k, v = make_qkv(np.random.default_rng(0), 256, 128, 4)
  options = KernelOptions(mask=MaskSpec("local_sliding", window=40), scale=H**-0.5)
  with pytest.raises(ValueError, match="no visible key"):
    splash_attention(q, k, v, options=options, q_positions=arange_positions(256),
                     kv_positions=arange_positions(128), interpret=True)


def test_cudnn_refuses_float32(monkeypatch):
  monkeypatch.setattr(jax.nn, "dot_product_attention", None)  # must not be reached
  q, k, v = make_qkv(np.random.default_rng(0), 128, 128, 4)
  options = KernelOptions(mask=MaskSpec("global"), scale=H**-0.5)
  with pytest.raises(ValueError, match="bfloat16"):
    cudnn_attention(q, k, v, options=options, q_positions=arange_positions(128),
                    kv_positions=arange_positions(128))


@pytest.mark.parametrize("head_dim, match", [(100, r"head_dim 100 \(runs a multiple of 8, <= 256"),
                                              (512, "head_dim 512")])
def test_cudnn_refuses_head_dims_it_cannot_run(head_dim, match, monkeypatch):
  """flash_gpu.CUDNN_LIMITS, checked before any GPU call (a multiple of 8 up to 256 on Hopper)."""
  monkeypatch.setattr(jax.nn, "dot_product_attention", None)  # must not be reached
  x = jnp.zeros((1, 16, 2, head_dim), jnp.bfloat16)  # [B, T, N, H]
  pos = jnp.arange(16)[None]  # [1, T]
  with pytest.raises(ValueError, match=match):
    cudnn_attention(x, x, x, options=KernelOptions(scale=0.1), q_positions=pos, kv_positions=pos)


def test_cudnn_refuses_float32_and_mixed_dtypes(monkeypatch):
  """train_kernel(half_precision=True): fp16 / bf16 operands of one dtype, before any GPU call."""
  monkeypatch.setattr(jax.nn, "dot_product_attention", None)  # must not be reached
  x = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)  # [B, T, N, H]
  pos = jnp.arange(16)[None]  # [1, T]
  for q, v, got in ((x.astype(jnp.float32), x.astype(jnp.float32), "float32/bfloat16/float32"),
                    (x, x.astype(jnp.float16), "bfloat16/bfloat16/float16")):
    with pytest.raises(ValueError, match="cudnn_attention needs float16 or bfloat16 "
                       f"query/key/value of one dtype, got {got}"):
      cudnn_attention(q, x, v, options=KernelOptions(scale=0.1), q_positions=pos, kv_positions=pos)


# ---- cuDNN vs reference (GPU only) -----------------------------------------------------

# (id, kv heads, MaskSpec, q_len, kv_len, extras: user "mask" / "bias").
CUDNN_CASES = [
    ("mha-causal", 4, MaskSpec("global"), 256, 256, {}),
    ("gqa-window", 2, MaskSpec("local_sliding", window=40), 256, 256, {}),
    ("mqa-full", 1, MaskSpec("full"), 256, 256, {}),
    ("gqa-causal-cross-length", 2, MaskSpec("global"), 128, 256, {}),
    ("gqa-full-user-mask", 2, MaskSpec("full"), 256, 256, {"mask": True}),
    ("mha-causal-user-bias", 4, MaskSpec("global"), 256, 256, {"bias": True}),
]


@pytest.mark.skipif(not cudnn_available(), reason="needs a GPU with cuDNN attention")
@pytest.mark.parametrize("kv_heads,spec,q_len,kv_len,extras", [case[1:] for case in CUDNN_CASES],
                         ids=[case[0] for case in CUDNN_CASES])
def test_cudnn_matches_reference(kv_heads, spec, q_len, kv_len, extras):
  """bfloat16 cuDNN against the float32 reference on the same (bf16-exact) inputs.

  The bound is calibrated, not guessed: cuDNN may be at most twice as far from
  the float32 result as the reference kernel itself run in bfloat16 with float32
  logits (which rounds the probabilities and the output to bf16, as cuDNN
  does), plus one bf16 ulp of slack.
  """
  rng = np.random.default_rng(0)
  q, k, v = make_qkv(rng, q_len, kv_len, kv_heads, jnp.bfloat16)
  cot = jnp.asarray(rng.normal(size=q.shape), jnp.bfloat16)  # [B, T, N, H]
  options = KernelOptions(mask=spec, scale=H**-0.5)
  kwargs = dict(options=options, q_positions=arange_positions(q_len),
                kv_positions=arange_positions(kv_len))
  if extras.get("mask"):
    user_mask = rng.random((B, N, q_len, kv_len)) < 0.7  # [B, N, T, S]
    user_mask[0, 1, 5] = False  # a query that sees nothing: zeros
    kwargs.update(mask=jnp.asarray(user_mask))
  if extras.get("bias"):
    kwargs.update(bias=jnp.asarray(rng.normal(size=(1, N, q_len, kv_len)), jnp.bfloat16))

  got, got_grads = values_and_grads(cudnn_attention, q, k, v, cot, **kwargs)
  f32 = lambda x: x.astype(jnp.float32)
  kwargs32 = dict(kwargs, bias=None if "bias" not in kwargs else f32(kwargs["bias"]))
  want, want_grads = values_and_grads(dot_product_attention, f32(q), f32(k), f32(v), f32(cot),
                                      **kwargs32)
  options_bf16 = dataclasses.replace(options, float32_qk_product=True, float32_logits=True)
  ref, ref_grads = values_and_grads(dot_product_attention, q, k, v, cot,
                                    **dict(kwargs, options=options_bf16))

  ulp = 2.0**-8
  err, bound = rel_err(got, want), 2 * rel_err(ref, want) + ulp
  print(f"cudnn {extras} out err {err:.2e} (bound {bound:.2e})")
  assert err < bound
  for name, g, w, r in zip(["dq", "dk", "dv"], got_grads, want_grads, ref_grads):
    err, bound = rel_err(g, w), 2 * rel_err(r, w) + ulp
    print(f"  {name} err {err:.2e} (bound {bound:.2e})")
    assert err < bound, name
  if extras.get("mask"):
    assert np.all(np.asarray(got, np.float32)[0, 5, 1] == 0)
