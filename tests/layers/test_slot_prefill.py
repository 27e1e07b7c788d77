"""Prefill on non-empty slots through a tiled train kernel over the whole slot (issue 20).

A chunk that continues a slot is written first and then attends over the
slot with the configured train kernel under an explicit position mask; it
must equal the block-by-block reference path (`attention=dot_product`) and
the train forward, for every mask kind, GQA/MQA, sinks, soft cap, quantized
and paged caches, ragged rows and padding. Ring buffers keep the reference
order (a chunk may overwrite what its own first queries read)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meshattn.kvcache import KVQuant
from meshattn.layers import Attention, MaskSpec
from meshattn.layers.serving import jit_step

CASES = {  # GQA throughout but for MQA; each case one compile of each path
    "mqa-window": dict(num_kv_heads=1, mask=MaskSpec("local_sliding", window=4),
                       sliding_window_ring_buffer=False),
    "chunk-sinks-softcap": dict(mask=MaskSpec("chunk", chunk=4), attention_sink=True,
                                attn_logits_soft_cap=5.0),
    "paged-int8": dict(paged_kv_cache=True, num_pages=12, tokens_per_page=4,
                       kv_quant=KVQuant("int8")),
}


def build(attention, **kw):
  model = Attention(emb_dim=32, num_query_heads=4, num_kv_heads=kw.pop("num_kv_heads", 2),
                    head_dim=8, attention=attention, rngs=nnx.Rngs(0), **kw)
  if model.settings.attention_sink:
    model.sinks[...] = jnp.linspace(-1.0, 1.0, 4)
  return model


@jit_step
def prefill(model, x, seg):
  return model(x, decoder_segment_ids=seg, model_mode="prefill")


def serve(model, x, seg2):
  """Two prefill calls: 5 tokens, then 4 more (ragged: row 1 adds only 2)."""
  cache = model.init_cache(2, 12)
  if hasattr(cache, "reserve_for_step"):
    cache.reserve_for_step(np.arange(2), 9)
  first = prefill(model, x[:, :5], jnp.ones((2, 5), jnp.int32))
  second = prefill(model, x[:, 5:9], seg2)
  return first, second


@pytest.mark.parametrize("case", sorted(CASES))
def test_slot_path_equals_the_reference_path(case, monkeypatch):
  x = jax.random.normal(jax.random.key(1), (2, 9, 32))
  seg2 = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0]], jnp.int32)
  reference = serve(build("dot_product", **CASES[case]), x, seg2)
  calls = []
  import meshattn.layers.kernels.train.blockwise as blockwise
  original = blockwise.blockwise_attention

  def spy(*args, **kwargs):
    calls.append(kwargs.get("mask") is not None)
    return original(*args, **kwargs)

  monkeypatch.setattr(blockwise, "blockwise_attention", spy)
  got = serve(build("blockwise", **CASES[case]), x, seg2)
  assert any(calls), "the second prefill did not run the tiled kernel over the slot"
  np.testing.assert_array_equal(got[1][1, 2:], 0.0)  # padding queries output zeros
  want = build("dot_product", **CASES[case])(x[:1, :9])  # train forward of row 0
  row0 = jnp.concatenate([got[0][:1], got[1][:1]], axis=1)
  if "kv_quant" in CASES[case]:
    # The slot path attends over the chunk's own keys as stored (quantized, like a decode
    # step), the reference path before writing them: both within the int8 bound.
    err = float(jnp.max(jnp.abs(row0 - want)) / jnp.max(jnp.abs(want)))
    assert err < 2e-2, err
    return
  for a, b in zip(got, reference):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(row0, want, rtol=2e-5, atol=2e-5)
