"""Part of test_two_processes.py: training as 2 processes x 4 CPU devices equals
1 process x 8 devices.

In `run` both processes run `train` with the data axis across them
(`dcn_data_parallelism=2`), each generating and placing only its own rows, and
checkpoint from both; `check` runs the same steps in the test's process on the
ici-only mesh of the same layout. The logged losses agree to float32 reduction
order (the cross-process sums go through gloo), and the checkpoint written by the
2 processes restores there, onto another mesh, to the same parameters.
"""

import json
import pathlib

import jax
import numpy as np
from flax import nnx

from meshattn.configs import load_config
from meshattn.scripts import checkpointing
from meshattn.scripts.train_loop import train
from meshattn.sharding import create_mesh

RUN = ["num_decoder_layers=1", "mlp_dim=64", "max_target_length=32",
       "max_prefill_predict_length=32", "task_max_pairs=4", "task_num_queries=2",
       "global_batch_size=8", "task_eval_rows=8", "log_period=1", "eval_period=2", "steps=2",
       "learning_rate=1e-2", "warmup_steps=0", "checkpoint_period=2",
       # Adam divides by sqrt(v) + eps: with the default 1e-8, a parameter whose gradient is
       # ~0 moves by ~lr in a direction set by reduction-order noise. A larger eps keeps the
       # comparison about the training, not about that noise.
       "adam_eps=1e-3"]
TOLERANCE = 1e-5  # relative; measured differences are float32 reduction order


def run(out_dir):
  """In each of the 2 processes: train and checkpoint; process 0 writes the logged losses."""
  cfg = load_config("tiny-lm", *RUN, "dcn_data_parallelism=2", "ici_data_parallelism=1",
                    "ici_fsdp_parallelism=-1", 'output_dir=""',
                    f"checkpoint_dir={out_dir}/checkpoints")
  result = train(cfg, progress=False)
  if jax.process_index() == 0:
    losses = [h["loss"] for h in result["history"]]
    pathlib.Path(out_dir, "losses.json").write_text(json.dumps(losses))


def check(out_dir):
  """Here, on 8 devices: the same training logs the same losses; the checkpoint restores."""
  out_dir = pathlib.Path(out_dir)
  two = json.loads((out_dir / "losses.json").read_text())
  cfg = load_config("tiny-lm", *RUN, "ici_data_parallelism=2", "ici_fsdp_parallelism=-1",
                    'output_dir=""', "checkpoint_period=0")
  one = train(cfg, progress=False)
  np.testing.assert_allclose(two, [h["loss"] for h in one["history"]], rtol=TOLERANCE,
                             err_msg="losses of 2 processes vs 1")

  ckpt = out_dir / "checkpoints"
  other = checkpointing.load_checkpoint_config(ckpt, "ici_tensor_parallelism=2",
                                               "ici_fsdp_parallelism=-1")
  restored = checkpointing.restore_params(ckpt, other, create_mesh(other))
  want = jax.tree_util.tree_leaves_with_path(one["params"])
  got = dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(restored, nnx.Param))))
  for path, value in want:
    value = np.asarray(value)
    np.testing.assert_allclose(np.asarray(got[path]), value, atol=TOLERANCE * np.max(np.abs(value)),
                               err_msg=jax.tree_util.keystr(path))
