"""Logical-axis rules -> PartitionSpecs, activation constraints, param placement."""

import os

import jax
import jax.numpy as jnp
import pytest
import yaml
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from meshattn.sharding import (
  constrain,
  create_mesh,
  create_sharded,
  get_param_shardings,
  get_param_specs,
  logical_to_sharding,
  logical_to_spec,
  shard_module,
)

BASE_YML = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "base.yml")


@pytest.fixture(scope="module")
def base():
  with open(BASE_YML) as f:
    return yaml.safe_load(f)


@pytest.fixture(scope="module")
def base_rules(base):
  return [tuple(rule) for rule in base["logical_axis_rules"]]


def _mesh(base, **sizes):
  """A mesh with base.yml's five axes; sizes default to 1."""
  config = {"mesh_axes": base["mesh_axes"], "ici_fsdp_parallelism": 1, **sizes}
  return create_mesh(config)


@pytest.fixture(scope="module")
def fsdp2_tensor4(base):
  return _mesh(base, ici_fsdp_parallelism=2, ici_tensor_parallelism=4)


# ---- logical_to_spec ----------------------------------------------------------


def test_first_free_rule_wins():
  rules = [("heads", "tensor"), ("heads", "fsdp"), ("embed", "tensor")]
  # embed's only rule collides with heads' axis -> replicated.
  assert logical_to_spec(("heads", "embed"), rules) == P("tensor", None)
  # embed first takes tensor, so heads falls through to fsdp.
  assert logical_to_spec(("embed", "heads"), rules) == P("tensor", "fsdp")


def test_multi_axis_rule(base, base_rules):
  mesh = _mesh(base, ici_data_parallelism=2, ici_fsdp_parallelism=2, ici_tensor_parallelism=2)
  spec = logical_to_spec(
    ("activation_batch", "activation_length", "activation_embed"), base_rules, mesh
  )
  assert spec == P(("data", "fsdp"), None, None)


def test_size_one_axes_dropped(base, base_rules):
  mesh = _mesh(base, ici_fsdp_parallelism=8)  # data is size 1
  assert logical_to_spec(("activation_batch",), base_rules, mesh) == P("fsdp")
  mesh = _mesh(base, ici_data_parallelism=8)
  assert logical_to_spec(("activation_batch",), base_rules, mesh) == P("data")


def test_rule_with_only_size_one_axes_is_skipped(base):
  mesh = _mesh(base, ici_fsdp_parallelism=8)
  rules = [("x", "context"), ("x", "fsdp")]
  assert logical_to_spec(("x",), rules, mesh) == P("fsdp")


def test_without_mesh_nothing_dropped(base_rules):
  assert logical_to_spec(("activation_batch",), base_rules) == P(("data", "fsdp"))


def test_used_axes_skipped(base, base_rules):
  mesh = _mesh(base, ici_data_parallelism=2, ici_fsdp_parallelism=4)
  spec = logical_to_spec(("activation_batch", "activation_batch"), base_rules, mesh)
  assert spec == P(("data", "fsdp"), None)


def test_partial_overlap_skips_whole_rule(base):
  mesh = _mesh(base, ici_data_parallelism=2, ici_fsdp_parallelism=4)
  rules = [("a", "fsdp"), ("b", ["data", "fsdp"]), ("b", "data")]
  assert logical_to_spec(("a", "b"), rules, mesh) == P("fsdp", "data")


def test_divisibility_skip(base):
  mesh = _mesh(base, ici_fsdp_parallelism=2, ici_tensor_parallelism=4)
  rules = [("heads", "tensor"), ("heads", "fsdp")]
  assert logical_to_spec(("heads",), rules, mesh, shape=(8,)) == P("tensor")
  assert logical_to_spec(("heads",), rules, mesh, shape=(6,)) == P("fsdp")
  assert logical_to_spec(("heads",), rules, mesh, shape=(3,)) == P(None)
  # Without a shape the check is off.
  assert logical_to_spec(("heads",), rules, mesh) == P("tensor")


def test_none_rule_replicates_and_stops(base):
  mesh = _mesh(base, ici_fsdp_parallelism=8)
  rules = [("embed", None), ("embed", "fsdp")]
  assert logical_to_spec(("embed",), rules, mesh) == P(None)


def test_unknown_and_none_names_replicated(base, base_rules):
  mesh = _mesh(base, ici_fsdp_parallelism=8)
  assert logical_to_spec(("no_such_name", None, "embed"), base_rules, mesh) == P(None, None, "fsdp")


def test_bad_axis_in_rule_raises(base):
  mesh = _mesh(base, ici_fsdp_parallelism=8)
  with pytest.raises(ValueError, match=r"'model'.*axis_names"):
    logical_to_spec(("embed",), [("embed", "model")], mesh)


def test_shape_rank_mismatch_raises(base_rules):
  with pytest.raises(ValueError, match="do not match shape"):
    logical_to_spec(("embed",), base_rules, shape=(2, 3))


def test_logical_to_sharding(fsdp2_tensor4, base_rules):
  sharding = logical_to_sharding(("embed", "q_heads", None), fsdp2_tensor4, base_rules)
  assert isinstance(sharding, NamedSharding)
  assert sharding.mesh is fsdp2_tensor4
  assert sharding.spec == P("fsdp", "tensor", None)


# ---- constrain ------------------------------------------------------------------


def test_constrain_inside_jit(base, base_rules):
  mesh = _mesh(base, ici_data_parallelism=2, ici_tensor_parallelism=4)
  names = ("activation_batch", "activation_length", "activation_heads", "activation_kv")

  @jax.jit
  def f(x):
    return constrain(x * 2, names, mesh, base_rules)

  out = f(jnp.ones((4, 6, 8, 16)))
  # Output specs come back with trailing Nones trimmed.
  assert out.sharding.spec == P("data", None, "tensor")
  assert out.sharding.is_equivalent_to(
    NamedSharding(mesh, P("data", None, "tensor", None)), out.ndim
  )


def test_constrain_skips_indivisible_dim(base, base_rules):
  mesh = _mesh(base, ici_data_parallelism=2, ici_tensor_parallelism=4)
  out = jax.jit(lambda x: constrain(x, ("activation_batch", "activation_heads"), mesh, base_rules))(
    jnp.ones((4, 6))
  )
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, P("data", None)), out.ndim)


def test_constrain_noop_without_mesh_or_names(fsdp2_tensor4, base_rules):
  x = jnp.ones((2, 3))
  assert constrain(x, ("embed", None), None, base_rules) is x
  assert constrain(x, None, fsdp2_tensor4, base_rules) is x


def test_constrain_rank_mismatch(fsdp2_tensor4, base_rules):
  with pytest.raises(ValueError, match="rank 2"):
    constrain(jnp.ones((2, 3)), ("embed",), fsdp2_tensor4, base_rules)


# ---- parameters -------------------------------------------------------------------


class Tiny(nnx.Module):
  """Two annotated parameters, one without metadata, and a non-param variable."""

  def __init__(self, rngs: nnx.Rngs):
    self.wq = nnx.Param(
      rngs.params.normal((16, 8, 4)), logical_axes=("embed", "q_heads", "kv_head_dim")
    )
    self.wo = nnx.Param(
      rngs.params.normal((8, 4, 16)), logical_axes=("q_heads", "kv_head_dim", "embed")
    )
    self.bias = nnx.Param(jnp.zeros((16,)))
    self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))


EXPECTED = {
  "wq": P("fsdp", "tensor", None),
  "wo": P("tensor", None, "fsdp"),
  "bias": P(),
  "count": P(),
}


def _spec_dict(specs):
  return {k: v for k, v in specs.items()}


def test_param_metadata_roundtrip():
  m = Tiny(nnx.Rngs(0))
  assert m.wq.get_metadata().get("logical_axes") == ("embed", "q_heads", "kv_head_dim")
  assert m.bias.get_metadata().get("logical_axes") is None


def test_get_param_specs(fsdp2_tensor4, base_rules):
  m = Tiny(nnx.Rngs(0))
  specs = get_param_specs(m, fsdp2_tensor4, base_rules)
  assert isinstance(specs, nnx.State)
  assert _spec_dict(specs) == EXPECTED
  # A State works as input too, and an abstract one as well.
  assert _spec_dict(get_param_specs(nnx.state(m), fsdp2_tensor4, base_rules)) == EXPECTED
  abstract = nnx.eval_shape(lambda: Tiny(nnx.Rngs(0)))
  assert _spec_dict(get_param_specs(abstract, fsdp2_tensor4, base_rules)) == EXPECTED


def test_get_param_shardings(fsdp2_tensor4, base_rules):
  shardings = get_param_shardings(Tiny(nnx.Rngs(0)), fsdp2_tensor4, base_rules)
  for key, spec in EXPECTED.items():
    assert shardings[key] == NamedSharding(fsdp2_tensor4, spec)


def test_param_shape_mismatch_named(fsdp2_tensor4, base_rules):
  class Bad(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((4, 4)), logical_axes=("embed",))

  with pytest.raises(ValueError, match=r"\['w'\].*logical_axes"):
    get_param_specs(Bad(), fsdp2_tensor4, base_rules)


def _assert_placed(module, mesh):
  state = nnx.state(module)
  for key, spec in EXPECTED.items():
    value = state[key].get_value()
    assert value.sharding.is_equivalent_to(NamedSharding(mesh, spec), value.ndim), key


def test_device_put_with_shardings(fsdp2_tensor4, base_rules):
  m = Tiny(nnx.Rngs(0))
  state = nnx.state(m)
  placed = jax.device_put(state, get_param_shardings(state, fsdp2_tensor4, base_rules))
  nnx.update(m, placed)
  _assert_placed(m, fsdp2_tensor4)


def test_shard_module(fsdp2_tensor4, base_rules):
  m = Tiny(nnx.Rngs(0))
  before = m.wq[...]
  assert shard_module(m, fsdp2_tensor4, base_rules) is m
  _assert_placed(m, fsdp2_tensor4)
  assert m.wq[...].sharding.spec == P("fsdp", "tensor", None)
  assert jnp.array_equal(m.wq[...], before)


def test_create_sharded(fsdp2_tensor4, base_rules):
  m = create_sharded(lambda: Tiny(nnx.Rngs(0)), fsdp2_tensor4, base_rules)
  assert isinstance(m, Tiny)
  _assert_placed(m, fsdp2_tensor4)
  # Same values as an unsharded build with the same seed.
  assert jnp.allclose(m.wq[...], Tiny(nnx.Rngs(0)).wq[...])
  # Metadata survives the jit round trip.
  assert m.wq.get_metadata().get("logical_axes") == ("embed", "q_heads", "kv_head_dim")


def test_create_sharded_with_rngs_argument(fsdp2_tensor4, base_rules):
  rngs = nnx.Rngs(0)
  m = create_sharded(Tiny, fsdp2_tensor4, base_rules, rngs)
  _assert_placed(m, fsdp2_tensor4)
  assert jnp.allclose(m.wq[...], Tiny(nnx.Rngs(0)).wq[...])
