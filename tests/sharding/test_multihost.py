"""The multi-host helpers in one process (8 fake devices): global arrays and their inverse,
the start-up from the environment. tests/multihost runs them in 2 processes."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from meshattn.sharding import (
  create_mesh,
  distributed_env,
  initialize_from_env,
  make_global_array,
  process_local_data,
  process_part,
)

AXES = ("data", "fsdp", "context", "tensor")
RULES = [("activation_batch", ["data", "fsdp"]), ("activation_length", "context"),
         ("activation_embed", "tensor")]
NAMES = ("activation_batch", "activation_length", "activation_embed")


def _mesh(data=2, fsdp=2, context=1, tensor=2):
  return create_mesh({"mesh_axes": AXES, "ici_data_parallelism": data, "ici_fsdp_parallelism": fsdp,
                      "ici_context_parallelism": context, "ici_tensor_parallelism": tensor})


def test_one_process_global_array_is_the_local_data_laid_out_by_the_rules():
  mesh = _mesh()
  x = np.arange(8 * 4 * 6, dtype=np.float32).reshape(8, 4, 6)
  g = make_global_array(x, NAMES, mesh, RULES)
  assert g.shape == x.shape
  assert g.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")), 3)
  np.testing.assert_array_equal(np.asarray(g), x)
  np.testing.assert_array_equal(process_local_data(g), x)
  np.testing.assert_array_equal(process_part(x, NAMES, mesh, RULES), x)  # one process: all of it


def test_process_local_data_of_a_jit_output():
  mesh = _mesh(context=2, tensor=1)
  x = np.random.default_rng(0).standard_normal((4, 8, 3)).astype(np.float32)
  g = make_global_array(x, NAMES, mesh, RULES)
  y = jax.jit(lambda a: a * 2)(g)
  np.testing.assert_array_equal(process_local_data(y), 2 * x)


def test_a_rule_dropped_for_divisibility_inside_one_process_is_fine():
  # 2 rows do not split over data x fsdp = 4: replicated, as the layer's own constraint is.
  # (Across processes that would change each process's share and raise: tests/multihost.)
  mesh = _mesh()
  x = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
  g = make_global_array(x, NAMES, mesh, RULES)
  assert g.sharding.spec == P(None, None, "tensor")
  np.testing.assert_array_equal(process_local_data(g), x)


def test_initialize_from_env_without_the_variables_does_nothing():
  assert initialize_from_env({}) is False
  assert initialize_from_env({"UNRELATED": "1"}) is False


def test_initialize_from_env_needs_all_three():
  env = distributed_env("127.0.0.1:1234", 2, 0)
  assert set(env) == {"MESHATTN_COORDINATOR_ADDRESS", "MESHATTN_NUM_PROCESSES",
                      "MESHATTN_PROCESS_ID"}
  del env["MESHATTN_PROCESS_ID"]
  with pytest.raises(ValueError, match=r"MESHATTN_PROCESS_ID missing"):
    initialize_from_env(env)
