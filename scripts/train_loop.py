"""Training the decoder on the recall task: optimizer, sharded steps, the loop, resume.

    from meshattn.scripts.train_loop import train
    summary = train(load_config("tiny-lm"), resume=False)

`train` runs on one process or several (every process calls it with the same
config, after `initialize_from_env`): parameters and optimizer state are
sharded by the logical rules over the whole mesh, and each process generates
and places only the rows of each batch that its devices hold
(`process_part` of the row indices, `make_global_array`), so the data never
crosses processes. One jitted step does forward, backward and the optax
update with the parameters and optimizer state donated.

Resume is bit-exact: a checkpoint holds the parameters, the optimizer state
(its step count drives the schedule) and the log so far; batches and dropout
keys are functions of (seed, step), so `2N steps == N steps + resume + N`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from meshattn.configs import Config
from meshattn.layers.decoder import Decoder
from meshattn.layers.settings import normalize_rules
from meshattn.scripts import checkpointing, train_report
from meshattn.scripts.recall_task import EVAL_STREAM, TRAIN_STREAM, RecallTask
from meshattn.sharding import (
  create_mesh, get_param_shardings, logical_to_spec, make_global_array, mesh_shape_string,
  process_part)

ROWS = ("activation_batch", "activation_length")  # every batch array is [B, T]


# ---- optimizer ---------------------------------------------------------------


def learning_rate_schedule(cfg: Config) -> optax.Schedule:
  """Linear warmup to `learning_rate` over `warmup_steps`, then `lr_schedule` until `steps`:
  constant, cosine (to 10% of peak) or linear (to 0)."""
  peak, warmup, total = cfg.learning_rate, cfg.warmup_steps, cfg.steps
  decay_steps = max(total - warmup, 1)
  after = {
      "constant": optax.constant_schedule(peak),
      "cosine": optax.cosine_decay_schedule(peak, decay_steps, alpha=0.1),
      "linear": optax.linear_schedule(peak, 0.0, decay_steps),
  }[cfg.lr_schedule]
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
  """AdamW on the schedule, after clipping to `grad_clip_norm` (0: no clipping)."""
  adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2,
                      eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
  if cfg.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
  return adamw


def model_flops_per_token(cfg: Config) -> float:
  """Training FLOPs per token (forward + backward = 3x the forward's 2 per multiply-add):
  every projection, the MLP and the logits, plus attention's scores and values over the
  keys a causal query sees on average (T/2 of a row, at most the window of a sliding layer).
  Divide tokens/s x this by the chip's peak for the MFU."""
  d, n, k, h, f, v = (cfg.emb_dim, cfg.num_query_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.mlp_dim, cfg.vocab_size)
  per_block = d * n * h + 2 * d * k * h + n * h * d + 3 * d * f  # weights a token multiplies by
  pattern = cfg.attention_layer_pattern or (cfg.attention_type,)
  keys = 0.0
  for i in range(cfg.num_decoder_layers):
    seen = cfg.max_target_length / 2
    if pattern[i % len(pattern)] == "local_sliding":
      seen = min(seen, cfg.sliding_window_size)
    keys += seen
  return 6.0 * (cfg.num_decoder_layers * per_block + d * v) + 12.0 * n * h * keys


# ---- loss --------------------------------------------------------------------


def answer_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """(sum of cross-entropy, correct answers, answers) over the weighted positions.

  logits [B, T, V] float32, targets [B, T] int, weights [B, T] (1 on answers)."""
  log_probs = jax.nn.log_softmax(logits, axis=-1)  # [B, T, V]
  picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [B, T]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)  # [B, T]
  return -jnp.sum(picked * weights), jnp.sum(correct * weights), jnp.sum(weights)


# ---- the compiled program -------------------------------------------------------

# Keys that steer the loop but not what is computed: runs that differ only in these share
# one compiled program (a resumed run in the same process, tests, notebooks).
_RUN_CONTROL_KEYS = frozenset({
    "output_dir", "checkpoint_dir", "checkpoint_period", "max_checkpoints_to_keep",
    "async_checkpointing", "log_period", "eval_period", "stop_at_accuracy", "task_eval_rows"})
_PROGRAMS: dict = {}


@dataclasses.dataclass
class Program:
  """What one (model, optimizer, mesh) compiles to: the model's graph, the optimizer, and
  the jitted init, train and eval steps (parameters and optimizer state donated)."""

  graphdef: Any
  tx: optax.GradientTransformation
  init: Any  # () -> (params, rest, opt_state), each born in its shards
  train_step: Any  # (params, opt_state, rest, batch, step) -> (params, opt_state, metrics)
  eval_step: Any  # (params, rest, batch) -> (loss sum, correct, answers)

  @classmethod
  def get(cls, cfg: Config, mesh: jax.sharding.Mesh) -> "Program":
    key = (tuple(sorted((k, v) for k, v in cfg.items() if k not in _RUN_CONTROL_KEYS)), mesh)
    if key not in _PROGRAMS:
      _PROGRAMS[key] = cls.build(cfg, mesh)
    return _PROGRAMS[key]

  @classmethod
  def build(cls, cfg: Config, mesh: jax.sharding.Mesh) -> "Program":
    rules = _rules(cfg)
    replicated = NamedSharding(mesh, PartitionSpec())
    make_model = lambda: Decoder(cfg, mesh=mesh, rngs=nnx.Rngs(cfg.seed))
    graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(make_model), nnx.Param, ...)
    param_shardings = nnx.to_pure_dict(get_param_shardings(abstract_params, mesh, rules))
    tx = make_optimizer(cfg)
    abstract_opt = jax.eval_shape(tx.init, nnx.to_pure_dict(abstract_params))
    # The moments mirror the parameter tree: each takes its parameter's sharding; the
    # step counts are replicated.
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)

    def init():
      _, params, rest = nnx.split(make_model(), nnx.Param, ...)
      params = nnx.to_pure_dict(params)
      return params, rest, tx.init(params)

    def logits_of(params, rest, batch, step, deterministic):
      model = nnx.merge(graphdef, params, rest)
      rngs = None
      if not deterministic:  # dropout keys from (seed, step): a resumed run draws the same
        rngs = nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(cfg.seed), step))
      return model(batch["inputs"], batch["positions"], batch["segment_ids"],
                   model_mode="train", deterministic=deterministic, rngs=rngs)  # [B, T, V]

    def train_step(params, opt_state, rest, batch, step):
      def loss_fn(params):
        logits = logits_of(params, rest, batch, step, deterministic=cfg.dropout_rate == 0)
        total, correct, count = answer_loss(logits, batch["targets"], batch["weights"])
        count = jnp.maximum(count, 1.0)
        return total / count, correct / count

      (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}
      return params, opt_state, metrics

    def eval_step(params, rest, batch):
      logits = logits_of(params, rest, batch, 0, deterministic=True)
      return answer_loss(logits, batch["targets"], batch["weights"])

    return cls(graphdef, tx,
               jax.jit(init, out_shardings=(param_shardings, replicated, opt_shardings)),
               jax.jit(train_step, donate_argnums=(0, 1),
                       out_shardings=(param_shardings, opt_shardings, replicated)),
               jax.jit(eval_step, out_shardings=replicated))


# ---- the run -----------------------------------------------------------------


@dataclasses.dataclass
class Trainer:
  """A run's state (parameters, optimizer state) on the mesh, its data, its program."""

  cfg: Config
  mesh: jax.sharding.Mesh
  task: RecallTask
  program: Program
  params: Any  # pure dict of parameter arrays, sharded by the rules
  rest: Any  # the model's other state (dropout streams), passed to every step
  opt_state: Any

  @classmethod
  def create(cls, cfg: Config, mesh: jax.sharding.Mesh) -> "Trainer":
    _check_batch(cfg, mesh)
    program = Program.get(cfg, mesh)
    params, rest, opt_state = program.init()
    return cls(cfg, mesh, RecallTask.from_config(cfg), program, params, rest, opt_state)

  def batch(self, stream: int, step: int, num_rows: int) -> dict[str, jax.Array]:
    """Batch `step` of `stream` as global [num_rows, T] arrays; this process makes only
    its own rows."""
    rules = _rules(self.cfg)
    mine = process_part(np.arange(num_rows), ROWS[:1], self.mesh, rules)
    local = self.task.rows(stream, step, mine)
    return {name: make_global_array(value, ROWS, self.mesh, rules,
                                    global_shape=(num_rows, value.shape[1]))
            for name, value in local.items()}

  def step(self, batch, step: int) -> dict[str, jax.Array]:
    self.params, self.opt_state, metrics = self.program.train_step(
        self.params, self.opt_state, self.rest, batch, jnp.int32(step))
    return metrics

  def evaluate(self, eval_batch) -> dict[str, float]:
    sums = self.program.eval_step(self.params, self.rest, eval_batch)
    total, correct, count = (float(x) for x in sums)
    return {"loss": total / max(count, 1.0), "accuracy": correct / max(count, 1.0),
            "answers": int(count)}


def _rules(cfg: Config):
  return normalize_rules(cfg.logical_axis_rules)


def _check_batch(cfg: Config, mesh: jax.sharding.Mesh) -> None:
  """Batches split evenly over the batch axes (every process feeds a whole share)."""
  spec = logical_to_spec(ROWS[:1], _rules(cfg), mesh)
  axes = () if spec[0] is None else (spec[0],) if isinstance(spec[0], str) else spec[0]
  shards = math.prod(mesh.shape[a] for a in axes)
  for key in ("global_batch_size", "task_eval_rows"):
    if cfg[key] % shards:
      raise ValueError(f"{key}={cfg[key]} must be divisible by the {shards} batch shards of "
                       f"mesh {mesh_shape_string(mesh)} (activation_batch -> {axes})")


def train(cfg: Config, *, resume: bool = False, stop_at_step: int | None = None,
          progress: bool = True, mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """Train `cfg` for `steps` steps (or until `stop_at_step`, as if preempted there, or
  until held-out accuracy reaches `stop_at_accuracy`); returns the summary.

  resume: continue from the latest checkpoint in the checkpoint directory (from scratch
  when there is none). Checkpoints are written every `checkpoint_period` steps and at the
  end when `checkpoint_period` > 0; the JSON log and the plot go to `output_dir`.
  """
  if resume and cfg.checkpoint_period == 0:
    raise ValueError("resume needs checkpoints: set checkpoint_period > 0 (and checkpoint_dir)")
  mesh = create_mesh(cfg) if mesh is None else mesh
  trainer = Trainer.create(cfg, mesh)
  history, evals, start = [], [], 0
  manager = None
  if cfg.checkpoint_period > 0:
    directory = checkpointing.checkpoint_directory(cfg)
    checkpointing.save_config(directory, cfg)
    manager = checkpointing.checkpoint_manager(directory, cfg)
    latest = manager.latest_step() if resume else None
    if latest is not None:
      trainer.params, trainer.opt_state, saved = checkpointing.restore_train_state(
          manager, latest, trainer.params, trainer.opt_state)
      history, evals, start = saved["history"], saved["evals"], int(saved["step"])
  end = cfg.steps if stop_at_step is None else min(cfg.steps, stop_at_step)
  eval_batch = trainer.batch(EVAL_STREAM, 0, cfg.task_eval_rows)
  schedule = learning_rate_schedule(cfg)
  tokens_per_step = cfg.global_batch_size * cfg.max_target_length
  flops_per_token = model_flops_per_token(cfg)
  bar = _progress_bar(progress, start, cfg.steps)
  began = time.perf_counter()
  last_time, last_step, done = began, start, start
  stopped_early = False
  while done < end:
    batch = trainer.batch(TRAIN_STREAM, done, cfg.global_batch_size)
    metrics = trainer.step(batch, done)
    done += 1
    if done % cfg.log_period == 0 or done == end:
      now = time.perf_counter()
      record = {"step": done, "loss": float(metrics["loss"]),
                "accuracy": float(metrics["accuracy"]), "grad_norm": float(metrics["grad_norm"]),
                "learning_rate": float(schedule(done - 1)),
                "tokens_per_s": tokens_per_step * (done - last_step) / (now - last_time)}
      record["model_tflops_per_s"] = record["tokens_per_s"] * flops_per_token / 1e12
      history.append(record)
      if not math.isfinite(record["loss"]):  # read on the host: every process sees it
        if manager is not None:
          manager.wait_until_finished()
          manager.close()
        raise FloatingPointError(
            f"loss is {record['loss']} at step {done} (learning_rate "
            f"{record['learning_rate']:.3g}; the loss is read every log_period steps, and the "
            "checkpoints saved so far are kept): lower learning_rate or raise warmup_steps")
      last_time, last_step = now, done
      if bar is not None:
        bar.update(done - bar.n)
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}",
                        eval=f"{evals[-1]['accuracy']:.3f}" if evals else "-",
                        tok_s=f"{record['tokens_per_s']:.0f}")
    if done % cfg.eval_period == 0 or done == end:
      if not evals or evals[-1]["step"] != done:
        evals.append({"step": done, **trainer.evaluate(eval_batch)})
      if cfg.stop_at_accuracy and evals[-1]["accuracy"] >= cfg.stop_at_accuracy:
        stopped_early = True
    if manager is not None and (done % cfg.checkpoint_period == 0 or done == end or stopped_early):
      progress_state = {"step": done, "history": history, "evals": evals}
      manager.save(done, args=checkpointing.save_args(trainer.params, trainer.opt_state,
                                                      progress_state), force=True)
    if stopped_early:
      break
  wall = time.perf_counter() - began
  if bar is not None:
    bar.close()
  if manager is not None:
    manager.wait_until_finished()
    manager.close()
  if not evals or evals[-1]["step"] != done:
    evals.append({"step": done, **trainer.evaluate(eval_batch)})
  summary = {"steps_done": done, "steps_this_run": done - start, "resumed_from": start,
             "wall_s_this_run": wall, "final_eval": evals[-1],
             "stopped_at_accuracy": stopped_early, "mesh": mesh_shape_string(mesh),
             "model_flops_per_token": flops_per_token,
             "last_tokens_per_s": history[-1]["tokens_per_s"] if history else None,
             "last_model_tflops_per_s": history[-1]["model_tflops_per_s"] if history else None,
             "processes": jax.process_count(), "devices": jax.device_count()}
  _write_outputs(cfg, summary, history, evals)
  trainer_result = dict(summary, history=history, evals=evals)
  trainer_result["params"] = trainer.params
  return trainer_result


def _progress_bar(enabled: bool, start: int, total: int):
  if not enabled or jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _write_outputs(cfg: Config, summary: dict, history: list, evals: list) -> None:
  if not cfg.output_dir or jax.process_index() != 0:
    return
  log = {"summary": summary, "config": checkpointing.model_config_dict(cfg),
         "history": history, "evals": evals}
  summary["log"] = str(train_report.write_log(cfg.output_dir, log))
  summary["plot"] = str(train_report.write_plot(
      cfg.output_dir, history, evals,
      f"recall: held-out accuracy {evals[-1]['accuracy']:.3f} at step {evals[-1]['step']}"))
