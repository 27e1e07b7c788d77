"""Prefill and decode on the 8-device mesh equal single-device decode, for the
contiguous and the paged cache; the cache lands where the rules say."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from meshattn.kvcache import KVQuant
from meshattn.layers import Attention, MaskSpec
from meshattn.sharding import create_mesh, shard_module

AXES = ("data", "fsdp", "context", "tensor", "autoregressive")


def mesh_of(**sizes):
  if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices")
  cfg = {"mesh_axes": AXES, **{f"ici_{a}_parallelism": sizes.get(a, 1) for a in AXES}}
  return create_mesh(cfg)


def build(mesh, **kw):
  return Attention(mesh=mesh, rngs=nnx.Rngs(0), emb_dim=32, num_query_heads=8, num_kv_heads=4,
                   head_dim=8, mask=MaskSpec("local_sliding", window=5), attention_sink=True, **kw)


@nnx.jit(static_argnames="mode")
def run(model, x, mode, segment_ids=None):
  return model(x, decoder_segment_ids=segment_ids, model_mode=mode)


def serve(model, prompts, seg, steps, paged):
  """Ragged prefill then `steps` decode steps; returns all outputs [B, P + steps, D]."""
  batch = prompts.shape[0]
  cache = model.init_cache(batch, 16)
  rows = jnp.arange(batch)
  if paged:
    cache.reserve_for_step(rows, prompts.shape[1])
  outs = [run(model, prompts, "prefill", seg)]
  new = jax.random.normal(jax.random.key(9), (batch, steps, 32))
  for i in range(steps):
    if paged:
      cache.reserve_for_step(rows, 1)
    outs.append(run(model, new[:, i:i + 1], "autoregressive"))
  return jnp.concatenate(outs, axis=1), cache


CACHE_KW = {"contiguous": {}, "paged": dict(paged_kv_cache=True, num_pages=24, tokens_per_page=4),
            "int8": dict(kv_quant=KVQuant("int8"))}


def requests():
  prompts = jax.random.normal(jax.random.key(1), (4, 6, 32))  # [B, P, D]
  seg = (jnp.arange(6)[None] < jnp.array([[6], [2], [4], [5]])).astype(jnp.int32)  # ragged
  return prompts, seg


@functools.cache
def single_device_outputs(cache_kind):
  """The single-device layer's outputs [B, P + 3, D]: one run per cache kind, shared by the
  meshes (each xdist worker computes it once)."""
  reference = build(None, **CACHE_KW[cache_kind])
  reference.sinks[...] = jnp.linspace(-1, 1, 8)
  want, _ = serve(reference, *requests(), 3, paged=cache_kind == "paged")
  return np.asarray(want)


@pytest.mark.parametrize("sizes", [dict(data=2, tensor=4), dict(data=4, tensor=2),
                                   dict(fsdp=2, autoregressive=2, tensor=2)],
                         ids=["d2t4", "d4t2", "f2a2t2"])
@pytest.mark.parametrize("cache_kind", ["contiguous", "paged", "int8"])
def test_sharded_decode_equals_single_device(sizes, cache_kind):
  mesh = mesh_of(**sizes)
  kw = CACHE_KW[cache_kind]
  prompts, seg = requests()
  want = single_device_outputs(cache_kind)

  model = build(mesh, **kw)
  model.sinks[...] = jnp.linspace(-1, 1, 8)
  shard_module(model, mesh, model.settings.logical_axis_rules)
  got, cache = serve(model, prompts, seg, 3, paged=cache_kind == "paged")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if cache_kind == "contiguous":
    # cache_batch over (data, fsdp, autoregressive), cache_heads over tensor.
    batch_axes = tuple(a for a in ("data", "fsdp", "autoregressive") if sizes.get(a, 1) > 1)
    spec = P(batch_axes if len(batch_axes) > 1 else batch_axes[0], None, "tensor", None)
    key = cache.key[...]
    assert key.sharding.is_equivalent_to(NamedSharding(mesh, spec), key.ndim), key.sharding
