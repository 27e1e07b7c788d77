"""Parameters round-trip through an Orbax checkpoint into a freshly built
(abstract, sharded) layer: the names and shapes are the checkpoint interface."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from meshattn.configs import load_config
from meshattn.layers import Attention
from meshattn.sharding import create_mesh, get_param_shardings


def test_orbax_round_trip_into_a_sharded_layer(tmp_path):
  cfg = load_config("tiny", "use_bias=true", "use_qk_norm=true", "attention_sink=true",
                    "ici_fsdp_parallelism=4", "ici_tensor_parallelism=2")
  mesh = create_mesh(cfg)
  source = Attention(cfg, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, cfg.emb_dim))
  want = source(x)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "attn", nnx.to_pure_dict(nnx.state(source, nnx.Param)))
  checkpointer.wait_until_finished()

  target = nnx.eval_shape(lambda: Attention(cfg, mesh=mesh, rngs=nnx.Rngs(7)))
  state = nnx.state(target, nnx.Param)
  shardings = get_param_shardings(state, mesh, target.settings.logical_axis_rules)
  abstract = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          state, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
  restored = checkpointer.restore(tmp_path / "attn", nnx.to_pure_dict(abstract))
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(target, state)
  query = target.query.kernel[...]
  assert query.sharding.is_equivalent_to(shardings["query"]["kernel"], query.ndim)
  np.testing.assert_allclose(target(x), want, rtol=1e-6, atol=1e-6)
  assert not jnp.allclose(Attention(cfg, rngs=nnx.Rngs(7))(x), want)  # the restore mattered
