"""Golden sharding snapshots: for every preset in configs/models/ and two 8-device topologies,
the PartitionSpec of every parameter, of every activation per mode and of every array of the
caches `init_cache` builds (contiguous and paged for softmax layers, the recurrent state for
linear ones; every layer of `attention_layer_pattern`), checked in as
tests/layers/sharding_snapshots.json.

A change of the logical rules, of a preset, or of a layer's logical names that moves a spec
fails here with a readable diff (key: checked-in -> now). If the move is intended, review it
and write the file again:

    MESHATTN_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest -q tests/layers/test_sharding_snapshots.py

Cheap: abstract meshes and jax.eval_shape, nothing is compiled or placed.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
from flax import nnx

from meshattn.configs import list_presets, load_config
from meshattn.kvcache import KVCache, LinearStateCache, PagedKVCache
from meshattn.layers import Attention
from meshattn.sharding import get_param_specs, logical_to_spec

SNAPSHOT = pathlib.Path(__file__).with_name("sharding_snapshots.json")
DEVICES = 8
# The preset's own mesh (its ici_* keys over 8 devices), and one that splits batch,
# sequence and heads at once so every rule that can move shows up.
TOPOLOGIES = {
    "preset": (),
    "d2c2t2": ("ici_data_parallelism=2", "ici_fsdp_parallelism=1", "ici_context_parallelism=2",
               "ici_tensor_parallelism=2", "ici_autoregressive_parallelism=1"),
}
BATCH = 8  # rows per step, divisible by every batch split above
CACHE = dict(batch_size=BATCH, max_length=64)
CACHE_KINDS = {KVCache: "contiguous", PagedKVCache: "paged", LinearStateCache: "linear_state"}


def _spec(spec) -> str:
  return str(tuple(spec))


def _abstract_mesh(cfg) -> jax.sharding.AbstractMesh:
  sizes = {}
  for axis in cfg.mesh_axes:
    ici, dcn = cfg[f"ici_{axis}_parallelism"], cfg[f"dcn_{axis}_parallelism"]
    sizes[axis] = (ici if ici != -1 else 1) * (dcn if dcn != -1 else 1)
  fill = DEVICES // max(1, _product(sizes.values()))
  for axis in cfg.mesh_axes:  # a -1 (at most one per prefix) takes what is left
    if -1 in (cfg[f"ici_{axis}_parallelism"], cfg[f"dcn_{axis}_parallelism"]):
      sizes[axis] *= fill
  return jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))


def _product(values) -> int:
  out = 1
  for v in values:
    out *= v
  return out


def _flat_specs(module, mesh, rules) -> dict[str, str]:
  specs = get_param_specs(nnx.state(module), mesh, rules)
  return {"/".join(str(k) for k in path): _spec(spec)
          for path, spec in nnx.to_flat_state(specs)}


def snapshot_of(preset: str) -> dict[str, str]:
  """Flat {"<topology>/<part>/<name>": "(spec entries)"} for one preset."""
  out = {}
  base = load_config(preset, num_devices=DEVICES)
  layer = nnx.eval_shape(lambda: Attention(base, rngs=nnx.Rngs(0)))
  s = layer.settings
  heads, kv_heads, head_dim = s.num_query_heads, s.num_kv_heads, s.head_dim
  caches = _built_caches(base)
  lengths = {"train": s.max_target_length, "prefill": s.max_prefill_predict_length,
             "autoregressive": 1}
  for topology, overrides in TOPOLOGIES.items():
    cfg = load_config(preset, *overrides, num_devices=DEVICES)
    mesh, rules = _abstract_mesh(cfg), s.logical_axis_rules
    for name, spec in _flat_specs(layer, mesh, rules).items():
      out[f"{topology}/params/{name}"] = spec
    for mode, length in lengths.items():
      axes = s.axes[mode]
      shapes = {"inputs": (BATCH, length, s.emb_dim), "query": (BATCH, length, heads, head_dim),
                "key": (BATCH, length, kv_heads, head_dim),
                "value": (BATCH, length, kv_heads, head_dim),
                "out": (BATCH, length, heads, head_dim)}
      for part, shape in shapes.items():
        spec = logical_to_spec(getattr(axes, part), rules, mesh, shape)
        out[f"{topology}/activations/{mode}/{part}"] = _spec(spec)
    for key, spec in _cache_specs(caches, mesh, rules).items():
      out[f"{topology}/cache/{key}"] = spec
  return out


def _built_caches(base) -> list[tuple[int, str, nnx.Module]]:
  """(layer_idx, kind, abstract cache) for what each layer of the pattern builds with
  init_cache, paged=False and paged=True (a linear layer builds its state cache either way)."""
  caches = []
  for layer_idx in range(max(1, len(base["attention_layer_pattern"]))):
    for paged in (False, True):
      def build(layer_idx=layer_idx, paged=paged):
        layer = Attention(base, rngs=nnx.Rngs(0), layer_idx=layer_idx)
        return layer.init_cache(**CACHE, paged=paged)
      cache = nnx.eval_shape(build)
      caches.append((layer_idx, CACHE_KINDS[type(cache)], cache))
  return caches


def _cache_specs(caches, mesh, rules) -> dict[str, str]:
  """{"<kind>/<name>": spec} of every cache array. Layers of one kind must agree, since the
  key does not name the layer."""
  out, built_by = {}, {}
  for layer_idx, kind, cache in caches:
    for name, spec in _flat_specs(cache, mesh, rules).items():
      key = f"{kind}/{name}"
      assert out.setdefault(key, spec) == spec, (
          f"layers {built_by[key]} and {layer_idx} build {key} with specs {out[key]} and "
          f"{spec}: record the cache per layer")
      built_by.setdefault(key, layer_idx)
  return out


def _diff(want: dict[str, str], got: dict[str, str]) -> list[str]:
  lines = []
  for key in sorted(set(want) | set(got)):
    if want.get(key) != got.get(key):
      lines.append(f"  {key}: {want.get(key, '(absent)')} -> {got.get(key, '(absent)')}")
  return lines


def test_sharding_snapshots_match():
  got = {preset: snapshot_of(preset) for preset in list_presets()}
  if os.environ.get("MESHATTN_UPDATE_SNAPSHOTS"):
    SNAPSHOT.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
  want = json.loads(SNAPSHOT.read_text())
  problems = []
  for preset in sorted(set(want) | set(got)):
    if preset not in got or preset not in want:
      problems.append(f"{preset}: preset {'added' if preset in got else 'removed'}")
      continue
    lines = _diff(want[preset], got[preset])
    if lines:
      problems.append(f"{preset}: {len(lines)} spec(s) moved\n" + "\n".join(lines))
  assert not problems, ("sharding snapshots moved (review, then rewrite with "
                        "MESHATTN_UPDATE_SNAPSHOTS=1):\n" + "\n".join(problems))


def test_the_snapshot_diff_names_what_moved():
  """The diff the test prints: a moved, a new and a dropped spec, each on its own line."""
  want = {"preset/params/query/kernel": "('fsdp', 'tensor', None)", "gone": "()"}
  got = {"preset/params/query/kernel": "('fsdp', None, None)", "new": "('data',)"}
  assert _diff(want, got) == [
      "  gone: () -> (absent)", "  new: (absent) -> ('data',)",
      "  preset/params/query/kernel: ('fsdp', 'tensor', None) -> ('fsdp', None, None)"]
