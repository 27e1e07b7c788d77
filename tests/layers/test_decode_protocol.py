"""The decode protocol's shared checks (kernels/api.py: `decode_kernel`,
`check_decode_operands`): every registered decode kernel runs them, once, before its own,
and each bad operand is named, for both layouts."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from meshattn.layers.kernels import registry
from meshattn.layers.kernels.api import check_decode_operands
from meshattn.layers.kernels.decode.paged import paged_decode_reference
from meshattn.layers.kernels.decode.ragged import ragged_decode_reference

B, S, K, H, N = 2, 8, 2, 4, 4


def test_every_registered_decode_kernel_runs_the_shared_checks():
  decode = [k for k in registry.kernels() if k.protocol == "decode"]
  assert len(decode) >= 6, [k.description for k in decode]
  for kernel in decode:
    fn = kernel.load()
    fn = fn.func if isinstance(fn, functools.partial) else fn
    want = "paged" if "paged_kv" in kernel.requires else "contiguous"
    assert getattr(fn, "decode_layout", None) == want, (kernel.name, kernel.description)


def _contiguous(**overrides):
  args = dict(query=jnp.ones((B, N, H)), key=jnp.ones((B, S, K, H)), value=jnp.ones((B, S, K, H)))
  args.update(overrides)
  return args


CONTIGUOUS_CASES = {
    "heads": (dict(query=jnp.ones((B, 3, H))), {}, "multiple of kv heads"),
    "head_dim": (dict(query=jnp.ones((B, N, H + 1))), {}, r"query must be \[B, N, H\]"),
    "value shape": (dict(value=jnp.ones((B, S, K, H + 1))), {}, "key and value must be of one"),
    "sinks": ({}, dict(sinks=jnp.ones((N + 1,))), r"sinks must be \[N\]"),
    "window": ({}, dict(window=0), "window=0"),
    "int8 without scales": (dict(key=jnp.ones((B, S, K, H), jnp.int8),
                                 value=jnp.ones((B, S, K, H), jnp.int8)), {}, "no key_scale"),
    "one scale": ({}, dict(key_scale=jnp.ones((B, K, S))), "given together"),
    "token-major scales": ({}, dict(key_scale=jnp.ones((B, S, K)), value_scale=jnp.ones((B, S, K))),
                           r"key_scale must be \[B, K or 1, S\]"),
}


@pytest.mark.parametrize("case", sorted(CONTIGUOUS_CASES))
def test_contiguous_operands_are_named(case):
  operands, kwargs, message = CONTIGUOUS_CASES[case]
  args = _contiguous(**operands)
  with pytest.raises(ValueError, match=message):
    check_decode_operands("contiguous", args["query"], args["key"], args["value"], **kwargs)
  with pytest.raises(ValueError, match=message):  # and through a kernel, before its own work
    ragged_decode_reference(args["query"], args["key"], args["value"], jnp.ones((B,), jnp.int32),
                            scale=1.0, **kwargs)


def test_paged_operands_are_named():
  pages, tpp = 6, 4
  q, kp = jnp.ones((B, N, H)), jnp.ones((pages, tpp, K, H))
  table, lengths = jnp.zeros((B, 3), jnp.int32), jnp.ones((B,), jnp.int32)
  owner, slots = jnp.full((pages,), -1, jnp.int32), jnp.arange(B, dtype=jnp.int32)
  call = lambda **kw: paged_decode_reference(q, kp, kp, table, lengths, scale=1.0,
                                             **{"page_owner": owner, "slots": slots, **kw})
  with pytest.raises(ValueError, match="page_owner must be an integer array"):
    call(page_owner=owner.astype(jnp.float32))
  with pytest.raises(ValueError, match="slots has shape"):
    call(slots=jnp.arange(B + 1, dtype=jnp.int32))
  with pytest.raises(ValueError, match=r"key_scale must be \[P, tpp, K or 1\]"):
    call(key_scale=jnp.ones((pages, K, tpp)), value_scale=jnp.ones((pages, K, tpp)))
  out = call()  # well formed: runs (no page owned, so zeros)
  np.testing.assert_array_equal(out, 0.0)
  with pytest.raises(ValueError, match="decode layout"):
    check_decode_operands("ring", q, kp, kp)
