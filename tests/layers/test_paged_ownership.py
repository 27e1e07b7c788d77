"""Paged decode kernels read only pages the row's slot owns, whatever the page table says.

Every paged path (reference, GPU kernel and TPU kernel in interpret mode, float32, bfloat16 and
int8 pools, split-K, several pages per step, under shard_map, and through the layer) gets a
page table whose rows point, inside their lengths, at pages they may not read: another live
slot's page holding a planted secret (values 1e4), another slot's page reserved ahead of its
length holding NaN / inf, a free page with stale data, an id past the pool, and a batch row
of no slot (-1) over free pages. The output must equal, bit for bit, the output with those
entries removed (-1, a missing page), and be finite; a control call, where the row does own
the secret's page, shows the secret would have reached the output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.kvcache.quant import KVQuant, quantize
from meshattn.kvcache.views import PagedView
from meshattn.layers import Attention
from meshattn.layers.kernels.decode import decode
from meshattn.layers.kernels.decode.paged import paged_decode_pallas, paged_decode_reference
from meshattn.layers.kernels.sharded import sharded_decode_call
from meshattn.layers.settings import ActivationAxes

from helpers.decode_inputs import attention_np, dequant_np

N, H, TPP, MAX_PAGES, NUM_PAGES, SCALE = 4, 16, 4, 4, 14, 0.3
SLOTS = np.array([2, 0, 1, -1], np.int32)  # row 3 is no slot: it owns nothing
LENGTHS = np.array([14, 8, 7, 5], np.int32)
TABLE = np.array([[5, 9, 2, 13],  # slot 2: the pool's last page, where a clamped id would land
                  [7, 3, 0, -1],  # slot 0; page 0 is reserved ahead of its length
                  [4, 12, -1, -1],  # slot 1
                  [-1, -1, -1, -1]], np.int32)  # pages 1, 6, 8, 10, 11 are free
SECRET, AHEAD, STALE = 3, 0, 6  # slot 0's live page, slot 0's page past its length, a free page
# (row, column) -> the page the corrupt table names there, inside the row's length.
CORRUPT = {(0, 1): SECRET, (0, 3): NUM_PAGES + 5, (1, 1): STALE, (2, 1): AHEAD,
           (3, 0): STALE, (3, 1): 1}
TOL = dict(atol=1e-5, rtol=1e-5)


def owners(table=TABLE, slots=SLOTS):
  owner = np.full(NUM_PAGES, -1, np.int32)  # [P]
  for row, slot in zip(table, slots):
    if slot >= 0:
      owner[row[row >= 0]] = slot
  return owner


def tables():
  """(corrupt table, the same with the corrupt entries removed) [B, maxp]."""
  corrupt, removed = TABLE.copy(), TABLE.copy()
  for (row, col), page in CORRUPT.items():
    corrupt[row, col], removed[row, col] = page, -1
  return corrupt, removed


def pools(kv_heads, dtype, quant_axis):
  """(query, key_pages, value_pages, scale kwargs, float64 K/V pools) with the pages planted:
  SECRET K 0 / V 1e4 (any row that reads it gets an output of ~1e3), STALE K 1e4 / V -1e4,
  AHEAD NaN / inf (in the int8 pools: 127 with NaN / inf scales)."""
  rng = np.random.default_rng(kv_heads)
  shape = (NUM_PAGES, TPP, kv_heads, H)
  q = rng.normal(size=(len(SLOTS), N, H)).astype(np.float32)
  k, v = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
  k[SECRET], v[SECRET], k[STALE], v[STALE] = 0.0, 1e4, 1e4, -1e4
  scales = {}
  if quant_axis:
    quant = KVQuant("int8", quant_axis)
    (k, ks), (v, vs) = ((np.array(a) for a in quantize(jnp.asarray(x), quant)) for x in (k, v))
    k64, v64 = dequant_np(k, ks), dequant_np(v, vs)
    k[AHEAD], v[AHEAD], ks[AHEAD], vs[AHEAD] = 127, 127, np.nan, np.inf
    scales = dict(key_scale=jnp.asarray(ks), value_scale=jnp.asarray(vs))  # [P, tpp, K|1]
    key_pages, value_pages = jnp.asarray(k), jnp.asarray(v)
  else:
    k64, v64 = k.astype(np.float64), v.astype(np.float64)
    k[AHEAD], v[AHEAD] = np.nan, np.inf
    key_pages, value_pages = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
  return jnp.asarray(q, dtype), key_pages, value_pages, scales, (k64, v64)


def expected_np(q, pools64, table, soft_cap, sinks):
  """float64 attention over each row's owned pages inside its length."""
  k64, v64 = pools64
  owned = (table >= 0) & (owners()[np.maximum(table, 0)] == SLOTS[:, None]) & (SLOTS[:, None] >= 0)
  ids = np.maximum(table, 0)
  k = k64[ids].reshape(len(SLOTS), MAX_PAGES * TPP, *k64.shape[2:])  # [B, C, K, H]
  v = v64[ids].reshape(k.shape)
  visible = np.repeat(owned, TPP, axis=1) & (np.arange(MAX_PAGES * TPP) < LENGTHS[:, None])
  return attention_np(np.asarray(q, np.float64), k, v, visible, scale=SCALE, soft_cap=soft_cap,
                      sinks=None if sinks is None else np.asarray(sinks))


def check_ownership(kernel, kv_heads, dtype=jnp.float32, quant_axis=None, soft_cap=None):
  """kernel(query, key_pages, value_pages, table, lengths, page_owner, slots, sinks, **scales)
  on the corrupt table == on the table with those entries removed, finite, and (float32 /
  int8) equal to float64 attention over the owned pages; the secret is visible when owned."""
  q, key_pages, value_pages, scales, pools64 = pools(kv_heads, dtype, quant_axis)
  sinks = jnp.linspace(-1.0, 1.0, N)
  corrupt, removed = tables()
  call = lambda table, owner: np.asarray(kernel(
      q, key_pages, value_pages, jnp.asarray(table), jnp.asarray(LENGTHS), jnp.asarray(owner),
      jnp.asarray(SLOTS), sinks, **scales), np.float64)  # [B, N, H]
  got, want = call(corrupt, owners()), call(removed, owners())
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(got[3], 0.0)  # a row of no slot reads nothing (the sink no value)
  if dtype == jnp.float32:
    tol = TOL if quant_axis is None else dict(atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got, expected_np(q, pools64, removed, soft_cap, sinks), **tol)
  # Control: with the secret's page handed to row 0's slot, the same call does read it.
  handed = owners()
  handed[SECRET] = SLOTS[0]
  leaked = call(corrupt, handed)
  assert np.abs(leaked[0] - got[0]).max() > 100.0
  np.testing.assert_array_equal(leaked[1:], got[1:])


def jitted(fn, **static):
  """fn under one jit per configuration; scales and sinks are traced."""
  def kernel(q, kp, vp, table, lengths, owner, slots, sinks, key_scale=None, value_scale=None):
    return fn(q, kp, vp, table, lengths, page_owner=owner, slots=slots, sinks=sinks,
              key_scale=key_scale, value_scale=value_scale, scale=SCALE, **static)
  return jax.jit(kernel)


@pytest.mark.parametrize("kv_heads, quant_axis", [(4, None), (2, None), (1, None), (2, "dkv")],
                         ids=["mha", "gqa", "mqa", "gqa-int8"])
def test_reference_reads_only_owned_pages(kv_heads, quant_axis):
  check_ownership(jitted(paged_decode_reference, soft_cap=2.0), kv_heads, quant_axis=quant_axis,
                  soft_cap=2.0)


# (kv_heads, dtype, int8 axis, static kernel options): float32 unsplit, int8 split-K with two
# pages per step, bfloat16 several pages per step.
GPU_CASES = {
    "gqa-f32": (2, jnp.float32, None, dict(pages_per_block=1, soft_cap=2.0)),
    "mqa-int8-split": (1, jnp.float32, "heads_and_dkv", dict(pages_per_block=2, num_splits=2)),
    "mha-bf16": (4, jnp.bfloat16, None, dict(pages_per_block=2)),
}


@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_kernel_reads_only_owned_pages(case):
  kv_heads, dtype, axis, static = GPU_CASES[case]
  kernel = jitted(paged_decode_pallas, backend="gpu", interpret=True, **static)
  check_ownership(kernel, kv_heads, dtype, axis, soft_cap=static.get("soft_cap"))


TPU_CASES = {
    "gqa-f32": (2, None, dict(pages_per_block=1, soft_cap=2.0)),
    "mha-int8": (4, "dkv", dict(pages_per_block=2)),
}


@pytest.mark.parametrize("case", list(TPU_CASES))
def test_tpu_kernel_reads_only_owned_pages(case):
  """The TPU index_maps fetch page 0 (here NaN, another slot's) for every removed entry; the
  kernel selects it away."""
  kv_heads, axis, static = TPU_CASES[case]
  kernel = jitted(paged_decode_pallas, backend="tpu", interpret=True, **static)
  check_ownership(kernel, kv_heads, quant_axis=axis, soft_cap=static.get("soft_cap"))


def test_ownership_arguments_are_checked():
  q, key_pages, value_pages, _, _ = pools(2, jnp.float32, None)
  args = (q, key_pages, value_pages, jnp.asarray(TABLE), jnp.asarray(LENGTHS))
  for fn in (paged_decode_reference, functools.partial(paged_decode_pallas, interpret=True)):
    with pytest.raises(ValueError, match="page_owner has shape"):
      fn(*args, page_owner=jnp.asarray(owners()[:-1]), slots=jnp.asarray(SLOTS), scale=SCALE)
    with pytest.raises(ValueError, match="slots must be an integer array"):
      fn(*args, page_owner=jnp.asarray(owners()), slots=jnp.asarray(SLOTS, jnp.float32),
         scale=SCALE)
    with pytest.raises(TypeError, match="page_owner"):
      fn(*args, scale=SCALE)  # required: a paged kernel never runs without the check


def test_sharded_decode_splits_slots_and_replicates_owners():
  """Under shard_map (batch over data, heads over tensor) each shard gets its rows' slots and
  the whole page_owner: the same output as one device, the corrupt entries still removed."""
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices")
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = (("activation_batch", "data"), ("activation_heads", "tensor"),
           ("activation_kv_heads", "tensor"))
  names = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
  kv_names = ("activation_batch", "activation_length", "activation_kv_heads", "activation_kv")
  axes = ActivationAxes(inputs=names[:2] + ("activation_embed",), query=names, key=kv_names,
                        value=kv_names, out=names)
  q, key_pages, value_pages, _, _ = pools(2, jnp.float32, None)
  corrupt, removed = tables()
  kernel = functools.partial(decode.paged_decode, implementation="reference")
  sinks = jnp.linspace(-1.0, 1.0, N)

  def run(table, mesh):
    # The paged cache's view of itself (kvcache/views.py), its logical axes as the cache names them.
    pool_axes = (None, None, "cache_heads", "cache_kv")
    view = PagedView(
        key_pages=key_pages, value_pages=value_pages, page_table=jnp.asarray(table),
        lengths=jnp.asarray(LENGTHS), page_owner=jnp.asarray(owners()), slots=jnp.asarray(SLOTS),
        key_scale=None, value_scale=None,
        axes=(("key_pages", pool_axes), ("value_pages", pool_axes),
              ("page_table", ("cache_batch", None)), ("lengths", ("cache_batch",)),
              ("page_owner", (None,)), ("slots", ("cache_batch",)), ("key_scale", ()),
              ("value_scale", ())),
        batch_name="cache_batch", heads_name="cache_heads")
    shared = dict(scale=SCALE, soft_cap=None, sinks=sinks)
    if mesh is None:
      return np.asarray(kernel(q, **view.arrays(), **shared))
    return np.asarray(sharded_decode_call(kernel, mesh, rules, axes, q, view, shared_args=shared))

  got = run(corrupt, mesh)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, run(removed, None), **TOL)
  np.testing.assert_allclose(got, run(corrupt, None), **TOL)


# ---- through the layer ------------------------------------------------------------------


@nnx.jit(static_argnames="mode")
def _run(model, x, mode):
  return model(x, model_mode=mode)


def test_layer_paged_decode_reads_only_owned_pages(monkeypatch):
  """decode_attention=paged through Attention: slot 0's table names slot 1's page (holding a
  planted secret) inside its length. The step check would reject that step; it is switched
  off here, as a bug would, so the kernel alone must keep the secret out: slot 0's output
  equals the output with that entry removed, and slot 1's is untouched."""
  from meshattn.kvcache.paged import PagedKVCache
  from meshattn.kvcache.step_checks import Rejection
  checks = PagedKVCache.step_conditions
  monkeypatch.setattr(PagedKVCache, "step_conditions", lambda self, rows, new_lengths: {
      k: v for k, v in checks(self, rows, new_lengths).items()
      if k != Rejection.PAGES_NOT_RESERVED})
  x = jax.random.normal(jax.random.key(3), (2, 7, 32))  # [B, T, D]

  def decode_after(entry):
    """Slot 0's first table entry set to `entry` (a page id, -1, or None: left alone)."""
    model = Attention(rngs=nnx.Rngs(0), emb_dim=32, num_query_heads=4, num_kv_heads=2,
                      head_dim=16, attention_sink=True, decode_attention="paged",
                      paged_kv_cache=True, num_pages=8, tokens_per_page=4)
    cache = model.init_cache(2, 16)
    rows = jnp.arange(2)
    cache.reserve_for_step(rows, 6)
    _run(model, x[:, :6], "prefill")
    cache.reserve_for_step(rows, 1)
    secret = cache.pages_of(1)[0]
    cache.key_pages[...] = cache.key_pages[...].at[secret].set(0.0)
    cache.value_pages[...] = cache.value_pages[...].at[secret].set(1e4)
    if entry is not None:
      page = secret if entry == "secret" else entry
      cache.page_table[...] = cache.page_table[...].at[0, 0].set(page)
    return np.asarray(_run(model, x[:, 6:], "autoregressive"))  # [B, 1, D]

  got, removed, clean = decode_after("secret"), decode_after(-1), decode_after(None)
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got[0], removed[0], **TOL)
  np.testing.assert_allclose(got[1], clean[1], **TOL)
  assert np.abs(got[0] - clean[0]).max() > 1e-3  # the entry mattered: slot 0 lost a page
