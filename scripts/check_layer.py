"""Check the attention layer alone on this host's devices: build the mesh, place the layer,
run train-mode forward and backward sharded and check it against the unsharded result; then
serve: a ragged prefill of prompts of different lengths and several decode steps on the mesh,
each sequence checked against the train-mode forward. (`make demo` runs the whole job: train,
checkpoint, serve; this is the layer-level check it grew from.)

    python scripts/check_layer.py [key=value ...]      # e.g. dtype=bfloat16 num_kv_heads=1
    make check-layer ARGS="num_kv_heads=1"             # 8 fake CPU devices
    python scripts/launch_local.py -n 2 --cpu-devices 4 -- scripts/check_layer.py   # 2 processes

Starts from the `tiny` preset (configs/base.yml with small sizes). With 4 or
more devices it splits them as data=2 x tensor=2 x fsdp=rest unless the
overrides say otherwise.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshattn.configs import load_config
from meshattn.layers import Attention
from meshattn.layers.serving import jit_step
from meshattn.sharding import get_param_specs, logical_to_spec, mesh_shape_string, shard_module

TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}
# A quantized KV cache is checked against its stated bound (tests/layers/test_modes.py).
KV_QUANT_TOLERANCE = {"int8": 2e-2, "int4": 0.25}


ROWS = ("activation_batch", "activation_length")


def to_global(model, a, names):
  """A host array every process holds in full -> the global array laid out by `names`
  (each process feeds its own rows; one process: a plain placement)."""
  from meshattn.sharding import make_global_array, process_part
  rules = model.settings.logical_axis_rules
  return make_global_array(process_part(np.asarray(a), names, model.mesh, rules), names,
                           model.mesh, rules)


def default_mesh_overrides(num_devices: int) -> list[str]:
  if jax.process_count() > 1:  # processes split the data axis (dcn), devices the rest
    return ["dcn_data_parallelism=-1", "ici_tensor_parallelism=2", "ici_fsdp_parallelism=-1"]
  if num_devices % 4 == 0:
    return ["ici_data_parallelism=2", "ici_tensor_parallelism=2", "ici_fsdp_parallelism=-1"]
  return []


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  print(f"\n{title}")
  line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))
  print(line(header))
  print("  ".join("-" * w for w in widths))
  for r in rows:
    print(line(r))


def parameter_rows(model, mesh, rules) -> list[list[str]]:
  specs = nnx.to_flat_state(get_param_specs(nnx.state(model, nnx.Param), mesh, rules))
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  rows = []
  for path, spec in specs:
    var = params[path]
    rows.append([".".join(map(str, path)), str(tuple(var.shape)),
                 str(var.get_metadata().get("logical_axes")), str(spec)])
  return rows


def activation_rows(cfg, settings, mesh, batch, length) -> list[list[str]]:
  axes = settings.axes["train"]
  n, k, h, d = cfg.num_query_heads, cfg.num_kv_heads, cfg.head_dim, cfg.emb_dim
  stages = [("inputs", axes.inputs, (batch, length, d)), ("query", axes.query, (batch, length, n, h)),
            ("key", axes.key, (batch, length, k, h)), ("value", axes.value, (batch, length, k, h)),
            ("context", axes.out, (batch, length, n, h)), ("output", axes.inputs, (batch, length, d))]
  rules = settings.logical_axis_rules
  return [[name, str(shape), str(names), str(logical_to_spec(names, rules, mesh, shape))]
          for name, names, shape in stages]


def train_step(model, x, pos, seg, cotangent):
  """Forward + backward under jit: (output, d/dx, d/dparams)."""

  @nnx.jit  # every array an argument: a global array cannot be closed over
  def step(model, x, pos, seg, cotangent):
    def loss(model, x):
      out = model(x, x, inputs_positions=pos, decoder_segment_ids=seg, model_mode="train")
      return jnp.sum(out.astype(jnp.float32) * cotangent), out
    (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return out, grads[1], grads[0]

  jax.block_until_ready(step(model, x, pos, seg, cotangent))  # compile
  start = time.perf_counter()
  result = jax.block_until_ready(step(model, x, pos, seg, cotangent))
  return result, (time.perf_counter() - start) * 1e3


def serving_check(model, reference, cfg, batch: int, steps: int = 4) -> tuple[list[list[str]], float]:
  """Ragged prefill of `batch` prompts then `steps` decode steps on the mesh;
  each row checked against the one-device train forward over its own tokens."""
  prompt_len = cfg.max_prefill_predict_length
  lengths = [prompt_len - (3 * b) % (prompt_len - 1) for b in range(batch)]  # all different-ish, >= 1
  x = jax.random.normal(jax.random.key(3), (batch, prompt_len + steps, cfg.emb_dim), jnp.dtype(cfg.dtype))
  seg = (jnp.arange(prompt_len)[None] < jnp.array(lengths)[:, None]).astype(jnp.int32)  # right padding

  # The serving pattern (docs/serving.md): a step compiled once, the cache updated in
  # place, a step the cache cannot serve raised as StepRejected with nothing changed.
  @jit_step(static_argnames="mode")
  def call(model, x, seg, mode):
    return model(x, decoder_segment_ids=seg, model_mode=mode)

  x, seg = to_global(model, x, cfg.input_axis_names), to_global(model, seg, ROWS)
  cache = model.init_cache(batch, cfg.max_target_length)
  paged = hasattr(cache, "reserve_for_step")
  slots = np.arange(batch)
  if paged:  # pages for every row's prompt, reserved on the host before the step
    cache.reserve_for_step(slots, np.asarray(lengths))
  start = time.perf_counter()
  prefill = jax.block_until_ready(call(model, x[:, :prompt_len], seg, "prefill"))
  prefill_ms = (time.perf_counter() - start) * 1e3
  decoded, decode_ms = [], []
  for i in range(steps):
    if paged:
      cache.reserve_for_step(slots, 1)
    start = time.perf_counter()
    decoded.append(jax.block_until_ready(
        call(model, x[:, prompt_len + i:prompt_len + i + 1], None, "autoregressive")))
    decode_ms.append((time.perf_counter() - start) * 1e3)
  rows, worst = [], 0.0
  for b in range(min(batch, 4)):
    n = lengths[b]
    xs = host(x)
    sequence = jnp.concatenate([xs[b:b + 1, :n], xs[b:b + 1, prompt_len:]], axis=1)  # [1, n + steps, D]
    want = reference(sequence, model_mode="train")[0]
    got = np.concatenate([host(prefill)[b, :n]] + [host(d)[b] for d in decoded], axis=0)
    err = relative_error(got, want)
    worst = max(worst, err)
    rows.append([str(b), str(n), str(steps), f"{err:.2e}"])
  rows.append(["...", f"prefill {prefill_ms:.1f} ms (with compile)",
               f"decode {decode_ms[-1]:.2f} ms/step", f"cache {(cache.key_pages if paged else cache.key)[...].sharding.spec}"])
  return rows, worst


def host(a) -> np.ndarray:
  """The whole array on this host (gathered from the other processes where it spans them)."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))
  return np.asarray(a)


def relative_error(a, b) -> float:
  a, b = host(a).astype(np.float64), host(b).astype(np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main(argv: list[str]) -> int:
  from meshattn.sharding import create_mesh, initialize_from_env

  initialize_from_env()  # under scripts/launch_local.py: join the other processes first
  overrides = default_mesh_overrides(jax.device_count()) + argv
  cfg = load_config("tiny", *overrides)
  mesh = create_mesh(cfg)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh: {mesh_shape_string(mesh)}")
  print(f"config: tiny + {overrides}")

  sharded = Attention(cfg, mesh=mesh, rngs=nnx.Rngs(0))
  rules = sharded.settings.logical_axis_rules
  reference = Attention(cfg, rngs=nnx.Rngs(0))  # same seed, no mesh: one device
  shard_module(sharded, mesh, rules)

  batch, length = 16, cfg.max_prefill_predict_length
  dtype = jnp.dtype(cfg.dtype)
  x = jax.random.normal(jax.random.key(1), (batch, length, cfg.emb_dim), dtype)  # [B, T, D]
  half = length // 2  # two packed documents per row, positions restart at 0
  pos = jnp.concatenate([jnp.arange(half), jnp.arange(length - half)])[None].repeat(batch, 0)
  seg = jnp.concatenate([jnp.ones(half, jnp.int32), jnp.full(length - half, 2, jnp.int32)])[None].repeat(batch, 0)
  cot = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
  inputs = (x, pos, seg, cot)
  x, pos, seg, cot = (to_global(sharded, a, n) for a, n in zip(
      inputs, (cfg.input_axis_names, ROWS, ROWS, cfg.input_axis_names)))

  print_table("parameters", ["name", "shape", "logical axes", "PartitionSpec"],
              parameter_rows(sharded, mesh, rules))
  print_table("activations (train mode)", ["stage", "shape", "logical axes", "PartitionSpec"],
              activation_rows(cfg, sharded.settings, mesh, batch, length))

  (out, gx, gp), ms = train_step(sharded, x, pos, seg, cot)
  (ref_out, ref_gx, ref_gp), ref_ms = train_step(reference, *inputs)
  grad_err = max(relative_error(a, b) for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(ref_gp)))
  tol = TOLERANCE[cfg.dtype]
  rows = [
      ["output", str(out.shape), str(out.dtype), f"{ms:.2f}", f"{ref_ms:.2f}",
       f"{relative_error(out, ref_out):.2e}", str(out.sharding.spec)],
      ["d/dx", str(gx.shape), str(gx.dtype), "", "", f"{relative_error(gx, ref_gx):.2e}",
       str(gx.sharding.spec)],
      ["d/dparams", f"{len(jax.tree.leaves(gp))} arrays", str(jax.tree.leaves(gp)[0].dtype), "", "",
       f"{grad_err:.2e}", ""],
  ]
  print_table(f"train step fwd+bwd, sharded vs one device (tolerance {tol:g}, max error relative to max |ref|)",
              ["result", "shape", "dtype", "sharded ms", "1-device ms", "max rel err", "sharding"], rows)
  serve_rows, serve_err = serving_check(sharded, reference, cfg, batch)
  serve_tol = max(tol, KV_QUANT_TOLERANCE[cfg.kv_quant_dtype]) if cfg.quantize_kvcache else tol
  print_table(f"serving: ragged prefill + decode on the mesh vs one-device train forward (tolerance {serve_tol:g})",
              ["row", "prompt tokens", "decode steps", "max rel err"], serve_rows)
  worst = max(relative_error(out, ref_out), relative_error(gx, ref_gx), grad_err)
  if worst > tol or serve_err > serve_tol:
    print(f"FAIL: train max error {worst:.2e} (tolerance {tol:g}), serving {serve_err:.2e} "
          f"(tolerance {serve_tol:g})")
    return 1
  print(f"OK: train max error {worst:.2e} <= {tol:g}; serving {serve_err:.2e} <= {serve_tol:g}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
