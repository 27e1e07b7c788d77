"""The layer's serving steps against their parts, timed in one run (the `layer` section).

    python scripts/bench_layer.py [--decode 64x4096 8x32768] [--caches contiguous paged int8]
    python scripts/bench_layer.py --cpu-smoke        # tiny shapes, seconds

Llama 3 8B attention shapes (emb 4096, 32 query / 8 kv heads, head_dim 128),
bf16, every slot filled to the given length. Rows:

  decode  `jit_step` (the documented serving pattern: split once, compiled
          once, donated, rejected steps raise, which reads one int32 per
          step), the same with check=False (no wait per step), a plain
          `nnx.jit` with donation, and 16 steps inside one `jax.jit`
          (`lax.scan`), against the parts: the
          layer's own decode kernel on the cache + the four projections + the
          one-token cache write, each timed alone and summed.
  prefill b8: fresh prompts (resets included) against the train-mode
          forward of the same tokens, and a 512-token chunk over 3584 cached
          tokens against projections + a flash-class pass (cuDNN on GPU,
          non-causal over all 4096 keys: an upper bound) + the 512-token write.
          The chunk's attention on the split path (layers/prefill_split.py:
          two cuDNN passes with their LSEs, merged) is also timed alone,
          against that cuDNN pass alone.

ratio = step / parts (or / train forward). Writes layer.json under --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meshattn.configs import load_config
from meshattn.kvcache import variable_arrays
from meshattn.layers import Attention, prefill_split
from meshattn.layers.kernels import dispatch, registry
from meshattn.layers.kernels.train import partial_attention
from meshattn.layers.cached_step import cached_step, step_positions
from meshattn.layers.prefill_attention import fresh_prompt_attention
from meshattn.layers.serving import jit_step
from meshattn.layers.step_inputs import host_raises_after_step
from meshattn.scripts.bench_common import fmt, time_fn

CACHE_KEYS = {"contiguous": (), "int8": ("quantize_kvcache=true", "kv_quant_dtype=int8"),
              "paged": ("paged_kv_cache=true",)}
SCAN_STEPS = 16


def build(dims: dict, cache_kind: str, batch: int, capacity: int, tpp: int):
  keys = [f"{k}={v}" for k, v in dims.items()] + list(CACHE_KEYS[cache_kind])
  if cache_kind == "paged":
    keys += [f"tokens_per_page={tpp}", f"num_pages={batch * -(-capacity // tpp)}"]
  cfg = load_config("llama3-8b", "dtype=bfloat16", "decode_attention=autoselected",
                    "attention=autoselected", f"max_target_length={max(capacity, 8192)}",
                    f"max_prefill_predict_length={capacity}", *keys)
  attn = Attention(cfg, rngs=nnx.Rngs(0))
  attn.init_cache(batch, capacity)
  return attn


def fill(attn, lengths: int) -> None:
  """Every slot holds `lengths` random tokens (written through the cache's own write)."""
  cache = attn.cache
  b, s = cache.batch_size, lengths
  if hasattr(cache, "reserve"):
    cache.reserve_for_step(np.arange(b), s)
  shape = (b, s, cache.num_kv_heads, cache.head_dim)
  k = jax.random.normal(jax.random.key(1), shape, jnp.bfloat16)
  v = jax.random.normal(jax.random.key(2), shape, jnp.bfloat16)
  pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  write = nnx.jit(lambda c, *a: c.write(*a), donate_argnums=0)
  write(cache, jnp.arange(b, dtype=jnp.int32), k, v, pos, jnp.ones((b, s), bool),
        jnp.full((b,), s, jnp.int32))


def set_lengths(attn, n: int) -> None:
  """Every slot's length to n: one small host-to-device copy (a serving loop's host work
  between steps is timed with the step; a jnp op and the Variable's hooks cost ~0.4 ms
  of the H200 host's time, a third of a chunk step)."""
  lengths = np.full(attn.cache.lengths.shape, n, np.int32)
  variable_arrays.replace(attn.cache.lengths, jax.device_put(lengths, attn.cache.lengths.sharding))


def decode_parts(attn, x) -> dict[str, float]:
  """The step's parts: the bare kernel alone, and kernel + projections + the one-token write
  in one compiled call (no RoPE, checks, masks or rotation: what a step must do)."""
  s = attn.settings
  cache = attn.cache
  b = x.shape[0]
  selected = dispatch.select(s, "autoregressive", selected_features(attn))
  if selected.name == "dot_product":  # the cached reference path (CPU): time the ragged reference
    selected = registry.select("paged" if hasattr(cache, "page_table") else "ragged",
                               registry.Request("cpu", "autoregressive", selected_features(attn)))
  kernel = dispatch.load(s, selected)
  common = dict(scale=s.scale, soft_cap=s.attn_logits_soft_cap, sinks=None)
  rows = jnp.arange(b, dtype=jnp.int32)

  def cache_args(cache, lengths):
    quant = cache.quant is not None
    scales = dict(key_scale=cache.key_scale[...] if quant else None,
                  value_scale=cache.value_scale[...] if quant else None)
    if hasattr(cache, "page_table"):
      return dict(key_pages=cache.key_pages[...], value_pages=cache.value_pages[...],
                  page_table=cache.page_table[...], lengths=lengths,
                  page_owner=cache.page_owner[...], slots=rows, **scales)
    return dict(key=cache.key[...], value=cache.value[...], lengths=lengths, window=None, **scales)

  q = jnp.ones((b, s.num_query_heads, s.head_dim), s.dtype)
  kernel_ms = time_fn(jax.jit(lambda q, a: kernel(q, **a, **common)), q,
                      cache_args(cache, cache.lengths[...]), iters=50)

  def bare_step(attn, x):
    query, key, value = attn._project_qkv(x, x)  # [b, 1, N, H], [b, 1, K, H]
    start = attn.cache.lengths[...]  # [b]
    attn.cache.write(rows, key, value, start[:, None], jnp.ones((b, 1), bool), start + 1)
    context = kernel(query[:, 0], **cache_args(attn.cache, start + 1), **common)  # [b, N, H]
    return attn.out(context[:, None])

  lengths = np.asarray(cache.lengths[...])  # a host copy: the step donates the cache's arrays
  bare_ms = time_fn(jit_step(bare_step, check=False), attn, x, iters=50)
  cache.lengths[...] = jnp.asarray(lengths)
  # The same with the weight matrices already in the compute dtype, as the scan rows get
  # them (cast once before the loop): the like-for-like baseline of a scan step.
  params = nnx.state(attn, nnx.Param)
  nnx.update(attn, jax.tree.map(lambda p: p.astype(s.dtype) if p.ndim >= 2 else p, params))
  cast_ms = time_fn(jit_step(bare_step, check=False), attn, x, iters=50)
  nnx.update(attn, params)
  cache.lengths[...] = jnp.asarray(lengths)
  return dict(kernel=kernel_ms, bare=bare_ms, bare_cast=cast_ms)


def project(attn, x):
  """The layer's four projections (q, k, v in; out on the query's shape)."""
  query, key, value = attn._project_qkv(x, x)
  return attn.out(query), key, value


def selected_features(attn):
  return dispatch.call_features(attn.settings, "autoregressive", cache=attn.cache)


def scan_steps(attn):
  """SCAN_STEPS decode steps inside one jax.jit: only the cache (the state but the
  parameters) is carried through the scan and donated, and the float32 weights are cast to
  the compute dtype once, before the loop: XLA:GPU converted them again in every step
  otherwise (the layer casts them where it uses them), ~50 us per step on the H200 here."""
  graphdef, params, state = nnx.split(attn, nnx.Param, ...)
  dtype = attn.settings.dtype

  @functools.partial(jax.jit, donate_argnums=1)
  def run(params, state, xs):
    params = jax.tree.map(lambda p: p.astype(dtype) if p.ndim >= 2 else p,
                          params)  # the weight matrices; norm scales stay float32

    def body(state, x):
      model = nnx.merge(graphdef, params, state)
      y = model(x, model_mode="autoregressive")
      return nnx.state(model, nnx.Not(nnx.Param)), y
    with host_raises_after_step():  # the caller reads `rejected` (no callback per step)
      return jax.lax.scan(body, state, xs)

  return graphdef, params, state, functools.partial(run, params)


def bench_decode(dims, shape: str, cache_kind: str, iters: int, tpp: int) -> list[dict]:
  b, kv = (int(n) for n in shape.split("x"))
  room = max(3 * (2 + 5 * iters) + 8, (2 + 5 * 2) * SCAN_STEPS) + 8  # time_fn: 2 warm-up + 5 reps
  attn = build(dims, cache_kind, b, kv + room, tpp)
  fill(attn, kv)
  if cache_kind == "paged":
    attn.cache.reserve_for_step(np.arange(b), room)
  x = jax.random.normal(jax.random.key(3), (b, 1, attn.settings.emb_dim), attn.settings.dtype)
  decode = lambda m, x: m(x, model_mode="autoregressive")
  step_ms = time_fn(jit_step(decode), attn, x, iters=iters)
  unchecked_ms = time_fn(jit_step(decode, check=False), attn, x, iters=iters)
  set_lengths(attn, kv)
  plain_ms = time_fn(nnx.jit(decode, donate_argnums=0), attn, x, iters=iters)
  set_lengths(attn, kv)
  graphdef, params, state, run = scan_steps(attn)
  xs = jnp.broadcast_to(x, (SCAN_STEPS,) + x.shape)
  holder = {"state": state}

  def scanned(xs):
    holder["state"], ys = run(holder["state"], xs)
    return ys

  scan_ms = time_fn(scanned, xs, iters=2) / SCAN_STEPS
  attn = nnx.merge(graphdef, params, holder["state"])
  set_lengths(attn, kv)
  parts = decode_parts(attn, x)
  bare = parts["bare"]
  name = f"b{b} kv{kv}"
  row = lambda what, ms, ratio: dict(section="decode", cache=cache_kind, shape=name, what=what,
                                     ms=ms, ratio=ratio)
  return [row("jit_step", step_ms, step_ms / bare),
          row("jit_step, check=False", unchecked_ms, unchecked_ms / bare),
          row("nnx.jit (donated)", plain_ms, plain_ms / bare),
          row(f"lax.scan x{SCAN_STEPS}", scan_ms, scan_ms / bare),
          row(f"lax.scan x{SCAN_STEPS} / parts, weights cast", scan_ms,
              scan_ms / parts["bare_cast"]),
          row("parts: kernel alone", parts["kernel"], None),
          row("parts: kernel+proj+write", bare, 1.0),
          row("parts, weights cast once", parts["bare_cast"], parts["bare_cast"] / bare)]


def bench_prefill(dims, batch: int, prompt: int, chunk: int, iters: int) -> list[dict]:
  attn = build(dims, "contiguous", batch, prompt, 16)
  d = attn.settings.emb_dim
  x = jax.random.normal(jax.random.key(4), (batch, prompt, d), attn.settings.dtype)
  step = jit_step(lambda m, x: m(x, model_mode="prefill"))
  unchecked = jit_step(lambda m, x: m(x, model_mode="prefill"), check=False)
  slots = list(range(batch))
  cached = prompt - chunk

  def timed(prepare, fn, x):
    """ms per call of prepare() (the host-side work a serving loop does first), then fn."""
    def run(x):
      prepare()
      return fn(attn, x)
    return time_fn(run, x, iters=iters)

  reset_each = lambda: [attn.cache.reset(slot) for slot in slots]  # freed one by one
  reset_all = lambda: attn.cache.reset(slots)  # the finished slots emptied in one call
  empty = lambda: set_lengths(attn, 0)
  fill = lambda: set_lengths(attn, cached)
  fresh_ms = timed(reset_each, step, x)
  fresh_one_reset_ms = timed(reset_all, step, x)
  resets_ms = time_fn(lambda: (reset_each(), attn.cache.lengths[...])[1], iters=iters)
  one_reset_ms = time_fn(lambda: (reset_all(), attn.cache.lengths[...])[1], iters=iters)
  fresh_only_ms = timed(empty, step, x)
  unchecked_ms = timed(empty, unchecked, x)
  one_reset_unchecked_ms = timed(reset_all, unchecked, x)  # the documented serving pattern
  train = jit_step(lambda m, x: m(x, model_mode="train"), donate=False, check=False)
  train_ms = time_fn(train, attn, x, iters=iters)
  chunk_ms = timed(fill, step, x[:, :chunk])
  chunk_unchecked_ms = timed(fill, unchecked, x[:, :chunk])
  s = attn.settings
  split_name, split_ms = split_alone(attn, batch, chunk, cached, iters)
  bare = bare_split_steps(attn, x, chunk, cached, iters)

  proj_ms = time_fn(jit_step(project, donate=False, check=False), attn, x[:, :chunk], iters=iters)
  q = jnp.ones((batch, chunk, s.num_query_heads, s.head_dim), s.dtype)
  k = jnp.ones((batch, prompt, s.num_kv_heads, s.head_dim), s.dtype)
  impl = "cudnn" if jax.default_backend() == "gpu" else "xla"
  flash = jax.jit(lambda q, k: jax.nn.dot_product_attention(q, k, k, implementation=impl))
  flash_ms = time_fn(flash, q, k, iters=iters)
  rows = jnp.arange(batch, dtype=jnp.int32)
  pos = cached + jnp.broadcast_to(jnp.arange(chunk, dtype=jnp.int32), (batch, chunk))
  kvs = jnp.ones((batch, chunk, s.num_kv_heads, s.head_dim), s.dtype)
  write = jit_step(lambda c, k: c.write(rows, k, k, pos, jnp.ones(pos.shape, bool), pos[:, -1] + 1),
                   check=False)
  write_ms = time_fn(write, attn.cache, kvs, iters=iters)
  parts = proj_ms + flash_ms + write_ms
  name = f"b{batch} {chunk} over {cached}"
  return [
      dict(section="prefill", cache="contiguous", shape=f"b{batch} s{prompt}", what="fresh prefill "
           f"(+{batch} resets)", ms=fresh_ms, ratio=fresh_ms / train_ms),
      dict(section="prefill", cache="contiguous", shape=f"b{batch} s{prompt}",
           what=f"{batch} resets alone", ms=resets_ms, ratio=resets_ms / train_ms),
      dict(section="prefill", cache="contiguous", shape=f"b{batch} s{prompt}",
           what=f"fresh prefill (+1 reset, {batch} slots)", ms=fresh_one_reset_ms,
           ratio=fresh_one_reset_ms / train_ms),
      dict(section="prefill", cache="contiguous", shape=f"b{batch} s{prompt}",
           what="  the same, check=False", ms=one_reset_unchecked_ms,
           ratio=one_reset_unchecked_ms / train_ms),
      dict(section="prefill", cache="contiguous", shape=f"b{batch} s{prompt}",
           what=f"1 reset of {batch} slots alone", ms=one_reset_ms, ratio=one_reset_ms / train_ms),
      dict(section="prefill", cache="contiguous", shape=f"b{batch} s{prompt}",
           what="fresh prefill, no resets", ms=fresh_only_ms, ratio=fresh_only_ms / train_ms),
      dict(section="prefill", cache="contiguous", shape=f"b{batch} s{prompt}",
           what="  the same, check=False", ms=unchecked_ms, ratio=unchecked_ms / train_ms),
      dict(section="prefill", cache="contiguous", shape=f"b{batch} s{prompt}", what="train forward",
           ms=train_ms, ratio=1.0),
      dict(section="prefill", cache="contiguous", shape=name, what="chunk step", ms=chunk_ms,
           ratio=chunk_ms / parts),
      dict(section="prefill", cache="contiguous", shape=name, what="  the same, check=False",
           ms=chunk_unchecked_ms, ratio=chunk_unchecked_ms / parts),
      dict(section="prefill", cache="contiguous", shape=name, what=f"  split alone ({split_name})",
           ms=split_ms, ratio=None if split_ms is None else split_ms / flash_ms),
      dict(section="prefill", cache="contiguous", shape=name, what=f"  {impl} alone",
           ms=flash_ms, ratio=1.0),
      *(dict(section="prefill", cache="contiguous", shape=shape, what=what, ms=ms,
             ratio=ms / (parts if "over" in shape else train_ms))
        for (shape, what), ms in bare.items()),
      dict(section="prefill", cache="contiguous", shape=name, what="parts: proj + "
           f"{impl} + write", ms=parts, ratio=1.0)]


def split_alone(attn, batch: int, chunk: int, cached: int, iters: int):
  """The chunk's attention on the split path alone (prefill_split: the slot's old entries
  read and zeroed past `cached`, two partial passes, the merge): (kernel name, ms), or
  (why not, None) where the layer does not take that path."""
  s = attn.settings
  kernel = prefill_split.partial_kernel(s)
  if kernel is None:
    if jax.default_backend() == "gpu":
      return "not used", None
    kernel = partial_attention.reference_partial_attention  # the CPU stand-in (--cpu-smoke)
  label = "cudnn" if kernel is partial_attention.cudnn_partial_attention else "xla reference"
  c, k, h = attn.cache.capacity, s.num_kv_heads, s.head_dim
  q = jax.random.normal(jax.random.key(5), (batch, chunk, s.num_query_heads, h), s.dtype)
  k_old = jax.random.normal(jax.random.key(6), (batch, c, k, h), s.dtype)
  k_new = jax.random.normal(jax.random.key(7), (batch, chunk, k, h), s.dtype)
  start = jnp.full((batch,), cached, jnp.int32)
  valid = jnp.ones((batch, chunk), bool)
  in_place = prefill_split.reads_in_place(attn.cache, s.dtype)  # as the layer's step reads it
  split = jax.jit(functools.partial(prefill_split.split_attention, kernel, start=start,
                                    valid=valid, scale=s.scale, old_zeroed=in_place))
  return label, time_fn(split, q, k_old, k_old, k_new, k_new, iters=iters)


def bare_split_steps(attn, x, chunk: int, cached: int, iters: int) -> dict:
  """The prefill step on the split path without the layer's checks, RoPE and norms
  (projections, `cached_step`, output projection; check=False), with the fresh-prompt
  `lax.cond` the layer puts around it and without (the split alone also serves empty
  slots: its first pass then sees no key). XLA:GPU runs a cond by copying the predicate
  to the host and waiting for it; these rows show what that costs, for the chunk over
  `cached` tokens and for the whole prompt on empty slots. {(shape, what): ms}."""
  s = attn.settings
  kernel = prefill_split.partial_kernel(s)
  if kernel is None and jax.default_backend() == "gpu":
    return {}
  kernel = kernel or partial_attention.reference_partial_attention  # CPU stand-in (--cpu-smoke)
  axes = s.axes["prefill"]
  split = prefill_split.split_chunk_attention(attn, attn.cache, axes, sinks=None, kernel=kernel,
                                              all_slots=True)  # rows 0..B-1, as the layer's
  options = dispatch.kernel_options(s)
  out = {}
  for length, start, label in ((chunk, cached, f"b{x.shape[0]} {chunk} over {cached}"),
                               (x.shape[1], 0, f"b{x.shape[0]} s{x.shape[1]}")):
    fresh = fresh_prompt_attention(attn, axes, padded=False, sinks=None, length=length)

    def bare(attn, x, with_cond):
      b, t = x.shape[:2]
      rows = jnp.arange(b, dtype=jnp.int32)
      query, key, value = attn._project_qkv(x, x)  # [b, T, N, H], [b, T, K, H]
      context = cached_step(attn.cache, rows, query, key, value,
                            positions=step_positions(attn.cache, rows, t),
                            valid=jnp.ones((b, t), bool), options=options,
                            fresh_attention=fresh if with_cond else None,
                            split_attention=split)  # [b, T, N, H]
      return attn.out(context)

    step = jit_step(bare, static_argnames="with_cond", check=False)
    for with_cond in (True, False):
      def run(x, with_cond=with_cond, start=start):
        set_lengths(attn, start)
        return step(attn, x, with_cond=with_cond)

      what = f"  bare split step, {'with' if with_cond else 'no'} cond"
      out[(label, what)] = time_fn(run, x[:, :length], iters=iters)
  return out


SMOKE_DIMS = dict(emb_dim=64, num_query_heads=4, num_kv_heads=2, head_dim=16)


def steps_section(args, platform: str) -> list:
  """The `steps` section of scripts/bench.py: these rows as bench rows (the ratio, step /
  parts or / train forward, in the status column: lower is better, unlike `x baseline`)."""
  del platform
  from meshattn.scripts.bench_common import Row  # pylint: disable=import-outside-toplevel
  dims = SMOKE_DIMS if args.cpu_smoke else {}
  iters = 2 if args.cpu_smoke else 20
  rows = []
  for b, kv in args.steps_decode:
    for kind in args.steps_caches:
      rows += bench_decode(dims, f"{b}x{kv}", kind, iters, 8 if args.cpu_smoke else 64)
  if args.steps_prefill:
    rows += bench_prefill(dims, *args.steps_prefill, iters)
  return [Row(f"steps {r['section']}", f"{r['cache']}: {r['what'].strip()}", r["shape"], r["ms"],
              None, "", status="" if r["ratio"] is None else f"{r['ratio']:.2f}x "
              f"{'train forward' if 'over' not in r['shape'] and r['section'] == 'prefill' else 'parts'}")
          for r in rows]


def print_table(rows: list[dict]) -> None:
  print(f"{'section':8} {'cache':10} {'shape':22} {'what':28} {'ms':>9} {'ratio':>7}")
  for r in rows:
    print(f"{r['section']:8} {r['cache']:10} {r['shape']:22} {r['what']:28} "
          f"{fmt(r['ms'], '9.3f')} {fmt(r['ratio'], '7.2f')}")


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--decode", nargs="*", default=["64x4096", "8x32768"])
  parser.add_argument("--caches", nargs="*", default=list(CACHE_KEYS))
  parser.add_argument("--prefill", default="8x4096x512", help="batch x prompt x chunk ('' = skip)")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--tokens-per-page", type=int, default=64)
  parser.add_argument("--out", default="bench_out")
  parser.add_argument("--cpu-smoke", action="store_true")
  args = parser.parse_args(argv)
  dims = {}
  if args.cpu_smoke:
    dims = SMOKE_DIMS
    args.decode, args.prefill, args.iters, args.tokens_per_page = ["2x32"], "2x32x8", 2, 8
  rows = []
  for shape in args.decode:
    for kind in args.caches:
      rows += bench_decode(dims, shape, kind, args.iters, args.tokens_per_page)
  if args.prefill:
    b, p, c = (int(n) for n in args.prefill.split("x"))
    rows += bench_prefill(dims, b, p, c, args.iters)
  print(f"# layer steps vs parts, {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print_table(rows)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "layer.json").write_text(json.dumps(rows, indent=1))
  return rows


if __name__ == "__main__":
  main()
