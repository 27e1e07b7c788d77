"""Checkpoints of the decoder model: the Orbax format scripts/train.py writes and how to
restore it, on any mesh.

A checkpoint directory (`checkpoint_dir`, default `<output_dir>/checkpoints`) holds

    config.yml          the resolved config of the run, without the mesh degrees
                        (ici_* / dcn_*): a model config loadable on any device count
    <step>/params       the model parameters, `nnx.to_pure_dict(nnx.state(model, nnx.Param))`
                        (tree: embedding, blocks/<i>/..., final_norm[, logits])
    <step>/opt_state    the optax state (training resume only)
    <step>/progress     JSON: {"step": ..., "history": [...], "evals": [...]}

Serving (another mesh, other serving keys):

    from meshattn.scripts.checkpointing import load_checkpoint_config, restore_params
    cfg = load_checkpoint_config(ckpt_dir, "ici_tensor_parallelism=2", "quantize_kvcache=true")
    mesh = create_mesh(cfg)
    model = restore_params(ckpt_dir, cfg, mesh)   # a Decoder, parameters placed by the rules

`restore_params` builds the model abstractly (no parameter is initialised),
reads only the `params` item, each array straight into its shards on `mesh`,
and works on one process or several (every process calls it).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml
from flax import nnx

from meshattn.configs import Config, load_config
from meshattn.layers.decoder import Decoder
from meshattn.sharding import get_param_shardings

CONFIG_FILE = "config.yml"
ITEMS = ("params", "opt_state", "progress")


def checkpoint_directory(cfg: Config) -> pathlib.Path:
  """`checkpoint_dir`, or `<output_dir>/checkpoints` when it is empty (absolute)."""
  path = cfg.checkpoint_dir or os.path.join(cfg.output_dir, "checkpoints")
  return pathlib.Path(path).expanduser().resolve()


def model_config_dict(cfg: Config) -> dict[str, Any]:
  """The config without its mesh degrees: what a checkpoint's model is, on any mesh."""
  return {k: v for k, v in cfg.to_dict().items()
          if not (k.endswith("_parallelism") and k.startswith(("ici_", "dcn_")))}


def save_config(directory: str | os.PathLike, cfg: Config) -> pathlib.Path:
  """Write `config.yml` into the checkpoint directory (process 0 only; others wait for it
  at the first save)."""
  path = pathlib.Path(directory) / CONFIG_FILE
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Written by meshattn scripts/train.py: the model and training config of this\n"
              "# checkpoint. Mesh degrees (ici_* / dcn_*) are left out: pass them as overrides.\n")
    text = yaml.safe_dump(model_config_dict(cfg), sort_keys=False, default_flow_style=None)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + text)
    tmp.replace(path)
  return path


def load_checkpoint_config(directory: str | os.PathLike, *overrides: str | dict,
                           num_devices: int | None = None) -> Config:
  """The config saved with a checkpoint plus `overrides` (mesh, serving keys), validated."""
  path = pathlib.Path(directory).expanduser() / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; is {directory} a checkpoint_dir written "
                            "by scripts/train.py?")
  return load_config(path, *overrides, num_devices=num_devices)


def checkpoint_manager(directory: str | os.PathLike, cfg: Config) -> ocp.CheckpointManager:
  """The Orbax manager of a training run: saves every `checkpoint_period` steps (async when
  `async_checkpointing`), keeping the last `max_checkpoints_to_keep` (0 = all)."""
  options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(cfg.checkpoint_period, 1),
      max_to_keep=cfg.max_checkpoints_to_keep or None,
      enable_async_checkpointing=cfg.async_checkpointing,
      create=True)
  return ocp.CheckpointManager(pathlib.Path(directory).expanduser().resolve(), options=options,
                               item_names=ITEMS)


def save_args(params, opt_state, progress: dict) -> ocp.args.Composite:
  """What one training step's checkpoint holds."""
  return ocp.args.Composite(params=ocp.args.StandardSave(params),
                            opt_state=ocp.args.StandardSave(opt_state),
                            progress=ocp.args.JsonSave(progress))


def abstract_like(tree):
  """ShapeDtypeStructs with the shardings of `tree`'s arrays: a restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def restore_train_state(manager: ocp.CheckpointManager, step: int, params, opt_state):
  """(params, opt_state, progress) of `step`, placed like the given (fresh) ones."""
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(abstract_like(params)),
      opt_state=ocp.args.StandardRestore(abstract_like(opt_state)),
      progress=ocp.args.JsonRestore()))
  return restored.params, restored.opt_state, restored.progress


def abstract_decoder(cfg: Config, mesh: jax.sharding.Mesh | None) -> Decoder:
  """A Decoder whose parameters are ShapeDtypeStructs (nothing initialised)."""
  return nnx.eval_shape(lambda: Decoder(cfg, mesh=mesh, rngs=nnx.Rngs(cfg.seed)))


def restore_params(directory: str | os.PathLike, cfg: Config, mesh: jax.sharding.Mesh | None,
                   *, step: int | None = None) -> Decoder:
  """A Decoder for `cfg` on `mesh` with the parameters of checkpoint `step` (default: the
  latest), each array read into its shards as the logical rules place it on `mesh`.

  `cfg` may differ from the training config in anything that leaves the parameter tree
  unchanged (mesh degrees, kernels, KV cache and quantization keys, dtype); a different
  tree or shape raises Orbax's error naming the parameter.
  """
  directory = pathlib.Path(directory).expanduser().resolve()
  manager = ocp.CheckpointManager(directory, item_names=ITEMS)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory}: no checkpoint steps found")
  model = abstract_decoder(cfg, mesh)
  state = nnx.state(model, nnx.Param)
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, state)
  else:
    shardings = get_param_shardings(state, mesh, model.rules)
  target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                        nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
  restored = manager.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(target))).params
  manager.close()
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  _materialize_other_state(model, cfg, mesh)
  return model


def _materialize_other_state(model: Decoder, cfg: Config, mesh) -> None:
  """Variables that are not parameters (the dropout streams when dropout_rate > 0) are
  still abstract after eval_shape: build them for real (the parameters are not, jit drops
  the unused outputs)."""
  rest = nnx.state(model, nnx.Not(nnx.Param))
  if not jax.tree.leaves(rest):
    return
  build = jax.jit(lambda: nnx.state(Decoder(cfg, mesh=mesh, rngs=nnx.Rngs(cfg.seed)),
                                    nnx.Not(nnx.Param)))
  nnx.update(model, build())
