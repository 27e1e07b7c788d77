"""The experimental Mosaic GPU int8 decode kernel (layers/kernels/decode/decode_int8_mgpu.py).

Its numbers are checked on a Hopper GPU by scripts/bench_int8_mgpu.py
(against ragged_decode_reference, with and without sinks, uniform and ragged
lengths, before timing). Here, on CPU: the query split it relies on, against
float64 NumPy; that the kernel still lowers to Mosaic GPU for CUDA
(jax.export, no GPU needed) for MHA, GQA and a 16-head group, both tilings,
split and unsplit, with sinks; and that bad arguments are refused before
any work.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import export

from meshattn.layers.kernels import registry
from meshattn.layers.kernels.decode import decode
from meshattn.layers.kernels.decode import decode_int8_mgpu as mgpu


@pytest.mark.parametrize("group", [1, 4, 16])
def test_split_query_reconstructs_rows(group):
  rng = np.random.default_rng(group)
  q = rng.standard_normal((2, 3, group, 128))
  q[0, 0, 0, :5] *= 300.0  # outlier channels: the small ones must survive
  q[1, 2, -1] = 0.0  # an all-zero row
  q = q.astype(np.float32)
  terms, row_scale = mgpu.split_query(jnp.asarray(q))
  terms, row_scale = np.asarray(terms, np.float64), np.asarray(row_scale, np.float64)
  assert terms.shape == (2, 3, 32, 128) and row_scale.shape == (2, 3, 16)
  assert np.abs(terms).max() <= 127
  n = mgpu.PADDED_GROUP
  hi, mid = terms[:, :, :n], terms[:, :, n:]
  r = mgpu.Q_RADIX
  recon = row_scale[..., None] * (hi + mid / r)  # [2, 3, 16, 128]
  amax = np.abs(q.astype(np.float64)).max(-1, keepdims=True)  # [2, 3, G, 1]
  err = np.abs(recon[:, :, :group] - q.astype(np.float64))
  # s / (2 R) from the split, plus float32 rounding of y = q / s (|y| <= 127),
  # as split_query's docstring states; and it is that tight.
  bound = amax / 127.0 * (0.5 / r + 127.0 * 2.0 ** -23)
  assert np.all(err <= bound + 1e-30)
  assert err.max() > 0.5 * (amax / 127.0 * 0.5 / r).min()
  # Small channels of the outlier row keep their value to 1.6e-5 of the row max.
  np.testing.assert_allclose(recon[0, 0, 0, 5:], q[0, 0, 0, 5:],
                             atol=float(amax[0, 0, 0, 0]) * 1.6e-5)
  assert np.all(terms[:, :, group:n] == 0) and np.all(row_scale[:, :, group:] == 0)
  assert np.all(recon[1, 2, group - 1] == 0)


def _avals(b=1, s=256, k=2, g=4, h=128, q_dtype=jnp.bfloat16, kv_dtype=jnp.int8, scale_shape=None,
           lengths_shape=None):
  """(query, key, value, lengths, key_scale, value_scale) shapes of one call (head-major scales)."""
  sds = jax.ShapeDtypeStruct
  scales = sds(scale_shape or (b, k, s), jnp.float32)
  return (sds((b, k * g, h), q_dtype), sds((b, s, k, h), kv_dtype), sds((b, s, k, h), kv_dtype),
          sds(lengths_shape or (b,), jnp.int32), scales, scales)


def _lower(group: int, h: int = 128, **kw):
  b, s, k = 2, 512, 2
  fn = jax.jit(lambda *a: mgpu.int8_decode_mgpu(*a, scale=h ** -0.5, **kw))
  exported = export.export(fn, platforms=["cuda"])(*_avals(b, s, k, group, h))
  assert exported.out_avals[0].shape == (b, k * group, h)
  return exported.mlir_module()


@pytest.mark.parametrize("group,kw", [
    (1, {}),
    (4, dict(num_splits=3, sinks=jnp.zeros((8,), jnp.float32))),
    (16, dict(block_kv=128, stages=2, num_splits=2)),
    (4, dict(h=256)),
])
def test_kernel_lowers_for_cuda(group, kw):
  module = _lower(group, **kw)
  assert "mosaic_gpu" in module


def test_auto_splits_fill_one_wave():
  assert mgpu.auto_splits(64 * 8, 64, cores=132) == 1  # 512 programs: ~2 waves already
  assert mgpu.auto_splits(132 * 2, 64, cores=132) == 1  # exactly one wave
  assert mgpu.auto_splits(136, 64, cores=132) == 2  # half a wave: not left half empty
  assert mgpu.auto_splits(8 * 8, 512, cores=132) == 4  # 64 programs -> 256 <= 264 resident
  assert mgpu.auto_splits(8 * 8, 16, cores=132) == 2  # at most one split per 8 blocks
  assert mgpu.auto_splits(8, 8, cores=132) == 1  # too few blocks to split


def test_launch_order_is_longest_first_and_stable():
  lengths = jnp.asarray([5, 300, 0, 300, 17, 4096, 5], jnp.int32)
  order = np.asarray(mgpu.launch_order(lengths))
  assert order.dtype == np.int32
  np.testing.assert_array_equal(order, [5, 1, 3, 4, 0, 6, 2])


def _decode_args(scale_heads=2, h=128, s=256):
  return _avals(b=2, s=s, h=h, scale_shape=(2, scale_heads, s))


def test_ragged_decode_routes_int8_to_this_kernel_where_measured(monkeypatch):
  monkeypatch.setattr(mgpu, "measured_faster_here", lambda: True)

  def lowered(args, **kw):
    fn = jax.jit(lambda q, k, v, l, ks, vs: decode.ragged_decode(
        q, k, v, l, scale=0.1, key_scale=ks, value_scale=vs, implementation="pallas", **kw))
    # The Triton call has no export compatibility guarantee; lowering is all we need.
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    return export.export(fn, platforms=["cuda"], disabled_checks=[triton])(*args).mlir_module()

  assert "mosaic_gpu" in lowered(_decode_args())
  # Outside its scope the Triton kernel takes the request: per-token scales
  # shared by the heads, head_dim 64, 256 (unmeasured) and 512 (over shared
  # memory), a soft cap, a cache length off the tile.
  for args, kw in ((_decode_args(scale_heads=1), {}), (_decode_args(h=64), {}),
                   (_decode_args(h=256), {}), (_decode_args(h=512), {}),
                   (_decode_args(), dict(soft_cap=30.0)), (_decode_args(s=200), {})):
    module = lowered(args, **kw)
    assert "mosaic_gpu" not in module and "triton" in module.lower()


def test_not_routed_off_hopper(monkeypatch):
  """Off Hopper (this CPU, an older GPU) and on Hopper parts it was not measured on, the Triton
  kernel keeps every request. Any platform: the device facts are patched, and where the
  suite runs (CPU, or a GPU with JAX_PLATFORMS=cuda,cpu) on_hopper reads the real device."""
  device = jax.devices()[0]
  assert mgpu.on_hopper() == (device.platform == "gpu"
                              and str(getattr(device, "compute_capability", "")).startswith("9"))
  # An int8 request in the kernel's scope (its registration: head_dim 128, per-head scales,
  # a cache length on the tile): only where it was measured does the registry pick it.
  request = registry.Request("gpu", "autoregressive", frozenset({"causal", "gqa", "quantized_kv"}),
                             head_dim=128, dtype=jnp.bfloat16, kv_len=256, kv_dtype=jnp.int8,
                             kv_quant_axis="dkv", group=4)
  entry = next(k for k in registry.kernels("ragged") if k.impl.endswith(":ragged_int8_decode"))
  try:
    monkeypatch.setattr(mgpu, "on_hopper", lambda: True)
    monkeypatch.setattr(mgpu, "MEASURED_FASTER_ON", (device.device_kind,))
    mgpu.measured_faster_here.cache_clear()
    assert entry.serves(request) and registry.select("ragged", request) is entry
    monkeypatch.setattr(mgpu, "on_hopper", lambda: False)
    mgpu.measured_faster_here.cache_clear()
    assert not mgpu.measured_faster_here()
    assert not entry.serves(request) and registry.select("ragged", request) is not entry
    # A Hopper part it was not measured on keeps the Triton kernel.
    monkeypatch.setattr(mgpu, "on_hopper", lambda: True)
    monkeypatch.setattr(mgpu, "MEASURED_FASTER_ON", ())
    mgpu.measured_faster_here.cache_clear()
    assert not mgpu.measured_faster_here()
    assert not entry.serves(request) and registry.select("ragged", request) is not entry
  finally:
    mgpu.measured_faster_here.cache_clear()  # recomputed from the real device after the patches


def _args(**kw):
  """Arrays of `_avals(**kw)`: zeros, and unit scales."""
  avals = _avals(**kw)
  return (*(jnp.zeros(a.shape, a.dtype) for a in avals[:4]),
          *(jnp.ones(a.shape, a.dtype) for a in avals[4:]))


@pytest.mark.parametrize("args,kw,match", [
    (_args(g=17), {}, "at most 16 query heads"),
    (_args(q_dtype=jnp.float32), {}, "query must be bfloat16 or float16"),
    (_args(kv_dtype=jnp.bfloat16), {}, "key and value must be int8"),
    (_args(scale_shape=(1, 256, 2)), {}, r"key_scale must be float32 \[B, K, S\]"),
    (_args(lengths_shape=(2,)), {}, r"lengths must be integer \[B\]"),
    (_args(h=64), {}, "head_dim must be 128 or 256"),
    (_args(h=192), {}, "head_dim must be 128 or 256"),
    (_args(h=384), {}, "head_dim must be 128 or 256"),
    (_args(s=200), {}, "multiple of block_kv=64"),
    (_args(), dict(block_kv=32), "block_kv must be 64 or 128"),
    ((_args()[0], jnp.zeros((1, 256, 256), jnp.int8), *_args()[2:]), {}, r"key must be \[B, S, K, H\]"),
    (_args(), dict(sinks=jnp.zeros((3,))), r"sinks must be \[N\]"),
    (_args(), dict(num_splits=0), "num_splits must be >= 1"),
    (_args(), dict(ablation="fast"), "ablation must be one of"),
])
def test_bad_arguments_are_refused(args, kw, match):
  with pytest.raises(ValueError, match=match):
    mgpu.int8_decode_mgpu(*args, scale=0.1, **kw)
