"""Training (scripts/train_loop.py, recall_task.py, checkpointing.py, train.py): the task's
rows, a few steps lower the loss, `2N steps == N + resume + N` bit-exactly, the saved
checkpoint restores onto another mesh, the CLI writes its log and plot, and the new config
keys are validated."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from meshattn.configs import ConfigError, load_config
from meshattn.scripts import checkpointing
from meshattn.scripts.recall_task import SEPARATOR, RecallTask
from meshattn.scripts.train_loop import train

# A 1-block model on short rows: each train() call compiles in a few seconds.
SMALL = ["num_decoder_layers=1", "mlp_dim=64", "max_target_length=32",
         "max_prefill_predict_length=32", "task_max_pairs=4", "task_num_queries=2",
         "global_batch_size=8", "task_eval_rows=8", "log_period=1", "eval_period=3",
         "learning_rate=1e-2", "warmup_steps=0", "ici_fsdp_parallelism=4", "ici_data_parallelism=2"]


def test_recall_rows_are_packed_examples_with_answers_marked():
  task = RecallTask.from_config(load_config("tiny-lm", num_devices=8))
  rows = task.rows(0, 5, [3, 4])
  again = task.rows(0, 5, [4])
  for name in rows:  # a row depends on its index, not on which rows are made with it
    np.testing.assert_array_equal(rows[name][1], again[name][0])
  row = {k: v[0] for k, v in rows.items()}
  for segment in range(1, row["segment_ids"].max() + 1):
    at = np.flatnonzero(row["segment_ids"] == segment)
    tokens = row["inputs"][at]
    np.testing.assert_array_equal(row["positions"][at], np.arange(len(at)))
    sep = int(np.flatnonzero(tokens == SEPARATOR)[0])
    pairs = dict(zip(tokens[0:sep:2], tokens[1:sep:2]))
    queries = tokens[sep + 1::2]
    answers = tokens[sep + 2::2]
    assert all(pairs[q] == a for q, a in zip(queries, answers))
    weighted = at[row["weights"][at] > 0]  # the positions that predict an answer: the queries
    np.testing.assert_array_equal(row["inputs"][weighted], queries)
    np.testing.assert_array_equal(row["targets"][weighted], answers)
  assert np.all(row["weights"][row["segment_ids"] == 0] == 0)


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_loss_falls_and_resume_is_bit_exact(tmp_path):
  def config(name, *extra):
    return load_config("tiny-lm", *SMALL, "steps=6", "checkpoint_period=3", 'output_dir=""',
                       f"checkpoint_dir={tmp_path / name}", *extra)

  straight = train(config("straight"), progress=False)
  losses = [h["loss"] for h in straight["history"]]
  assert losses[-1] < 0.8 * losses[0], losses
  first = train(config("resumed"), stop_at_step=3, progress=False)
  assert first["steps_done"] == 3
  second = train(config("resumed"), resume=True, progress=False)
  assert second["resumed_from"] == 3 and second["steps_this_run"] == 3
  assert [h["loss"] for h in second["history"]] == losses  # the log carries over the resume
  a, b = _flat(straight["params"]), _flat(second["params"])
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)

  # The checkpoint's parameters come back whole on one device (onto another mesh, with
  # logits: tests/multihost/part_train_loop.py).
  ckpt = tmp_path / "resumed"
  restored = checkpointing.restore_params(ckpt, checkpointing.load_checkpoint_config(ckpt), None)
  got = _flat(nnx.to_pure_dict(nnx.state(restored, nnx.Param)))
  assert got.keys() == b.keys()
  for key in b:
    np.testing.assert_array_equal(got[key], b[key], err_msg=key)


def test_cli_writes_log_and_plot(tmp_path, capsys):
  from meshattn.scripts.train import main
  # steps=6 as above (one compiled program in this process), stopped after 2.
  assert main(["tiny-lm", *SMALL, "steps=6", f"output_dir={tmp_path}", "--stop-at-step", "2",
               "--no-progress"]) == 0
  log = json.loads((tmp_path / "train_log.json").read_text())
  assert [h["step"] for h in log["history"]] == [1, 2]
  assert log["evals"][-1]["step"] == 2 and 0 <= log["evals"][-1]["accuracy"] <= 1
  assert log["config"]["num_decoder_layers"] == 1
  assert (tmp_path / "train_curves.png").read_bytes()[:4] == b"\x89PNG"
  assert '"steps_done": 2' in capsys.readouterr().out


@pytest.mark.parametrize("override,key", [
    ("vocab_size=20", "vocab_size"),  # < 2 + 16 keys + 16 values
    ("task_max_pairs=40", "task_max_pairs"),  # more than task_num_keys
    ("task_min_pairs=9", "task_min_pairs"),  # above task_max_pairs
    ("lr_schedule=step", "lr_schedule"),
    ("remat_policy=everything", "remat_policy"),
    ("mlp_activation=relu", "mlp_activation"),
    ("warmup_steps=5000", "warmup_steps"),
    ("adam_b2=1.0", "adam_b2"),
    ("learning_rate=0", "learning_rate"),
    ("global_batch_size=0", "global_batch_size"),
    ("stop_at_accuracy=1.5", "stop_at_accuracy"),
    ("max_target_length=16 max_prefill_predict_length=16", "task_max_pairs"),  # too long a row
])
def test_bad_training_keys_name_the_key(override, key):
  with pytest.raises(ConfigError, match=f"^{key}:"):
    load_config("tiny-lm", *override.split(), num_devices=8)


def test_batch_that_does_not_split_over_the_mesh_is_refused():
  cfg = load_config("tiny-lm", *SMALL, "global_batch_size=12", 'output_dir=""')
  with pytest.raises(ValueError, match="global_batch_size=12 must be divisible by the 8"):
    train(cfg, progress=False)
