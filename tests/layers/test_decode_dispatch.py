"""decode_attention = ragged / paged through the layer: prefill + decode equals
the train forward, on one device and under shard_map on the mesh; the Pallas
kernels in interpret mode; unsupported requests are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.kvcache import KVQuant
from meshattn.layers import Attention, MaskSpec
from meshattn.layers.kernels import registry
from meshattn.sharding import shard_module

from helpers.meshes import mesh_of


def build(mesh=None, **kw):
  return Attention(mesh=mesh, rngs=nnx.Rngs(0), emb_dim=32, num_query_heads=4, num_kv_heads=2,
                   head_dim=16, attention_sink=True, **kw)


@nnx.jit(static_argnames="mode")
def run(model, x, mode, seg=None):
  return model(x, decoder_segment_ids=seg, model_mode=mode)


def serve(model, x, prompt_len, lengths):
  """Ragged prefill (row b has lengths[b] real tokens) then decode to the end of x."""
  batch = x.shape[0]
  cache = model.init_cache(batch, 16)
  paged = hasattr(cache, "reserve_for_step")
  rows = jnp.arange(batch)
  if paged:
    cache.reserve_for_step(rows, prompt_len)
  seg = (jnp.arange(prompt_len)[None] < jnp.asarray(lengths)[:, None]).astype(jnp.int32)
  prefill = run(model, x[:, :prompt_len], "prefill", seg)
  steps = []
  for t in range(prompt_len, x.shape[1]):
    if paged:
      cache.reserve_for_step(rows, 1)
    steps.append(run(model, x[:, t:t + 1], "autoregressive"))
  return prefill, jnp.concatenate(steps, axis=1)


def expected(model, x, prompt_len, lengths):
  """Each row's own train forward over its real prompt tokens then the decoded tokens: row b
  is its n = lengths[b] prompt tokens and the decoded ones at positions 0.., right-padded to
  x's length (segment 0: causal attention keeps padding out of the real tokens); one
  compiled train call for every row."""
  decoded = x.shape[1] - prompt_len
  rows = [jnp.concatenate([x[b, :n], x[b, prompt_len:], jnp.zeros_like(x[b, :prompt_len - n])])
          for b, n in enumerate(lengths)]  # [T, D] each
  seg = jnp.asarray([[1] * (n + decoded) + [0] * (prompt_len - n) for n in lengths], jnp.int32)
  out = run(model, jnp.stack(rows), "train", seg)  # [B, T, D]
  return jnp.stack([out[b, n:n + decoded] for b, n in enumerate(lengths)])  # the decode positions


CASES = {
    "ragged": dict(decode_attention="ragged"),
    "ragged-window-ring": dict(decode_attention="ragged", mask=MaskSpec("local_sliding", window=3)),
    "ragged-window-linear": dict(decode_attention="ragged", mask=MaskSpec("local_sliding", window=3),
                                 sliding_window_ring_buffer=False),
    "ragged-int8-softcap": dict(decode_attention="ragged", kv_quant=KVQuant("int8"),
                                attn_logits_soft_cap=3.0),
    "paged": dict(decode_attention="paged", paged_kv_cache=True, num_pages=12, tokens_per_page=4),
    "paged-int8": dict(decode_attention="paged", paged_kv_cache=True, num_pages=12, tokens_per_page=4,
                       kv_quant=KVQuant("int8", "heads_and_dkv")),
    "ragged-pallas-interpret": dict(decode_attention="ragged", pallas_interpret=True),
    "paged-pallas-interpret": dict(decode_attention="paged", pallas_interpret=True,
                                   paged_kv_cache=True, num_pages=12, tokens_per_page=4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_kernel_equals_train(case):
  kw = CASES[case]
  model = build(**kw)
  model.sinks[...] = jnp.linspace(-1.0, 1.0, 4)
  x = jax.random.normal(jax.random.key(1), (3, 9, 32))  # [B, T, D]
  lengths = [5, 2, 4]
  _, decoded = serve(model, x, 5, lengths)
  want = expected(model, x, 5, lengths)
  bound = 2e-2 if "kv_quant" in kw else 1e-5
  err = float(jnp.max(jnp.abs(decoded - want)) / jnp.max(jnp.abs(want)))
  assert err < bound, err


@pytest.mark.parametrize("case", ["ragged", "paged"])
def test_sharded_decode_kernel_equals_single_device(case):
  mesh = mesh_of(data=2, fsdp=2, tensor=2)
  kw = {**CASES[case], "num_pages": 24} if case == "paged" else CASES[case]
  x = jax.random.normal(jax.random.key(2), (4, 8, 32))
  lengths = [5, 1, 3, 4]
  reference = build(**kw)
  want = serve(reference, x, 5, lengths)
  model = shard_module(build(mesh, **kw), mesh, reference.settings.logical_axis_rules)
  got = serve(model, x, 5, lengths)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_unsupported_decode_requests_are_refused():
  chunked = build(decode_attention="ragged", mask=MaskSpec("chunk", chunk=4))
  chunked.init_cache(1, 8)
  run(chunked, jnp.ones((1, 2, 32)), "prefill")
  with pytest.raises(ValueError, match=r"ragged.*\['chunk'\]"):
    run(chunked, jnp.ones((1, 1, 32)), "autoregressive")
  contiguous = build(decode_attention="paged")  # refused when the cache is built, not later
  with pytest.raises(ValueError, match=r"decode_attention='paged' reads a paged cache only"):
    contiguous.init_cache(1, 8)


@pytest.mark.parametrize("platform, dtype, paged, want, query_dtype", [
    ("gpu", jnp.bfloat16, False, "Triton (GPU)", jnp.bfloat16),
    ("gpu", jnp.int8, True, "Triton (GPU)", jnp.bfloat16),
    ("gpu", jnp.int4, False, "Triton (GPU)", jnp.float32),  # the ragged GPU kernel reads int4
    ("gpu", jnp.int4, False, "Triton (GPU)", jnp.bfloat16),  # ... under a 16-bit query too
    ("gpu", jnp.int4, True, "JAX reference", jnp.float32),  # the paged kernel does not
    ("tpu", jnp.int8, False, "Mosaic TPU", jnp.bfloat16),
    ("tpu", jnp.int4, False, "JAX reference", jnp.bfloat16),
    ("cpu", jnp.bfloat16, False, "JAX reference", jnp.bfloat16),
])
def test_decode_implementation_per_platform(platform, dtype, paged, want, query_dtype):
  """The registry's decode rows (each registered in its kernel's module): the Pallas kernel on
  GPU and TPU, the reference where no Pallas kernel reads the cache and on CPU (the Mosaic GPU
  int8 kernel only where it was measured faster: not on this host)."""
  name = "paged" if paged else "ragged"
  features = frozenset({"causal", "gqa"} | ({"quantized_kv"} if dtype != jnp.bfloat16 else set())
                       | ({"paged_kv"} if paged else set()))
  request = registry.Request(platform, "autoregressive", features, head_dim=64,
                             dtype=query_dtype, kv_len=256, kv_dtype=dtype,
                             kv_quant_axis=None if dtype == jnp.bfloat16 else "dkv", group=4)
  assert registry.select(name, request).description == want
