"""The typed groups of AttentionSettings (layers/specs.py, layers/cache_specs.py).

A config and the equivalent keywords build equal specs; the cache is a tagged choice
(contiguous | paged | a linear layer's state) whose impossible mixes raise naming the
keys, from the keywords and from a config; init_cache builds the tagged kind; settings
stay hashable, comparable and replaceable (they are static arguments to jit). No
compiles beyond one trivial jit: about 1 s.
"""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from meshattn.configs import load_config
from meshattn.configs.validation import ConfigError
from meshattn.kvcache.cache import KVCache
from meshattn.kvcache.paged import PagedKVCache
from meshattn.kvcache.quant import KVQuant
from meshattn.kvcache.state import LinearStateCache
from meshattn.layers.attention import Attention
from meshattn.layers.cache_specs import ContiguousCache, PagedCache, StateCache
from meshattn.layers.masks import MaskSpec
from meshattn.layers.settings import DEFAULT_LOGICAL_AXIS_RULES, AttentionSettings

# base.yml's rules: the layer's table plus the decoder model's (vocab and MLP) entries.
CONFIG_RULES = DEFAULT_LOGICAL_AXIS_RULES + (
    ("vocab", "tensor"), ("mlp", "tensor"), ("activation_vocab", "tensor"),
    ("activation_mlp", "tensor"))
TINY = dict(emb_dim=64, num_query_heads=4, num_kv_heads=2, max_target_length=64,
            max_prefill_predict_length=32, logical_axis_rules=CONFIG_RULES)
GEMMA2 = dict(emb_dim=3584, num_query_heads=16, num_kv_heads=8, head_dim=256,
              attn_logits_soft_cap=50.0, query_pre_attn_scalar=256.0,
              logical_axis_rules=CONFIG_RULES)
GROUPS = ("shape", "projection", "kernel", "sharding", "lengths", "cache", "mask", "rope",
          "linear")

# name: (config, overrides, layer_idx, the same layer as keywords)
CASES = {
    "tiny": ("tiny", (), 0, TINY),
    "tiny-paged": ("tiny", ("paged_kv_cache=true", "num_pages=8", "tokens_per_page=4"), 0,
                   dict(TINY, cache=PagedCache(num_pages=8, tokens_per_page=4))),
    "tiny-int8-kv": ("tiny", ("quantize_kvcache=true", "kv_quant_axis=heads_and_dkv"), 0,
                     dict(TINY, kv_quant=KVQuant("int8", "heads_and_dkv"))),
    # Gemma 2's sliding layer, with chunked prefill and a decode-cache layout; the
    # keywords spell out head_dim's default scale and the ring buffer's default.
    "gemma2-window": ("gemma2-9b", ("use_chunked_prefill=true", "prefill_chunk_size=64",
                                    "ar_cache_axis_order=[0, 2, 1, 3]"), 0,
                      dict(GEMMA2, mask=MaskSpec("local_sliding", window=4096),
                           use_chunked_prefill=True, prefill_chunk_size=64,
                           cache=ContiguousCache(ar_cache_axis_order=(0, 2, 1, 3),
                                                 sliding_window_ring_buffer=True))),
    "gemma2-global": ("gemma2-9b", (), 1, GEMMA2),
}


@pytest.mark.parametrize("case", CASES)
def test_config_and_keywords_build_equal_specs(case):
  name, overrides, layer_idx, keywords = CASES[case]
  from_config = AttentionSettings.from_config(load_config(name, *overrides), layer_idx=layer_idx)
  from_keywords = AttentionSettings(**keywords)
  for group in GROUPS:
    assert getattr(from_config, group) == getattr(from_keywords, group), group
  assert from_config == from_keywords  # the flat record too: cache= unfolds into it


def test_specs_hold_resolved_values():
  """Derived defaults are resolved and knobs that do nothing are not stored, so two
  spellings of one layer compare equal, and different layers do not."""
  derived = AttentionSettings(emb_dim=64, num_query_heads=4, qk_norm_type="l2")
  spelled = AttentionSettings(emb_dim=64, num_query_heads=4, num_kv_heads=4, head_dim=16,
                              out_features=64, kv_emb_dim=64, query_pre_attn_scalar=16.0)
  assert derived.shape == spelled.shape and derived.shape.group_size == 1
  assert derived.kernel == spelled.kernel and derived.kernel.scale == 16 ** -0.5
  assert derived.projection == spelled.projection and derived.projection.qk_norm is None
  assert derived.lengths.prefill_chunk_size is None  # prefill_chunk_size without chunking
  normed = AttentionSettings(emb_dim=64, num_query_heads=4, use_qk_norm=True, qk_norm_type="l2")
  assert normed.projection.qk_norm == "l2" and normed.projection != derived.projection
  linear = AttentionSettings.from_config(load_config("hybrid-linear"), layer_idx=0)
  assert linear.cache == StateCache() and linear.cache.kv_quant is None


def test_paged_cache_has_no_contiguous_knobs():
  """The tagged kinds make the impossible mix unwritable: no ring or order on a page pool."""
  assert not {"sliding_window_ring_buffer", "ar_cache_axis_order"} & {
      f.name for f in dataclasses.fields(PagedCache)}
  with pytest.raises(TypeError, match="sliding_window_ring_buffer"):
    PagedCache(sliding_window_ring_buffer=True)


@pytest.mark.parametrize("build, error, match", [
    # Flat keywords / config keys that ask a paged cache for an axis order.
    (lambda: AttentionSettings(emb_dim=16, num_query_heads=2, paged_kv_cache=True,
                               ar_cache_axis_order=(0, 2, 1, 3)),
     ValueError, r"ar_cache_axis_order=\(0, 2, 1, 3\) with paged_kv_cache=True: lays out the "
                 r"contiguous decode cache only"),
    (lambda: load_config("tiny", "paged_kv_cache=true", "ar_cache_axis_order=[0, 2, 1, 3]"),
     ConfigError, r"ar_cache_axis_order: lays out the contiguous decode cache only; .*"
                  r"\(paged_kv_cache is true\)"),
    # ... or for a ring: true said in so many words (unset means "a ring where contiguous").
    (lambda: AttentionSettings(emb_dim=16, num_query_heads=2, paged_kv_cache=True,
                               sliding_window_ring_buffer=True),
     ValueError, r"sliding_window_ring_buffer=True with paged_kv_cache=True: is the contiguous "
                 r"cache's ring"),
    (lambda: load_config("tiny", "paged_kv_cache=true", "sliding_window_ring_buffer=true"),
     ConfigError, r"sliding_window_ring_buffer: true is the contiguous cache's ring; .*"
                  r"\(paged_kv_cache is true\)"),
    (lambda: load_config("tiny", "sliding_window_ring_buffer=1"),
     ConfigError, r"sliding_window_ring_buffer: expected bool or null, got int 1"),
    (lambda: AttentionSettings(emb_dim=16, num_query_heads=2, sliding_window_ring_buffer="yes"),
     ValueError, r"sliding_window_ring_buffer='yes': must be True, False or None"),
    # The typed spec and the flat keys it stands for, both given.
    (lambda: AttentionSettings(emb_dim=16, num_query_heads=2, cache=PagedCache(), num_pages=4),
     ValueError, r"give it or \['num_pages'\], not both"),
    (lambda: AttentionSettings.from_config(load_config("tiny"), cache=ContiguousCache(),
                                           paged_kv_cache=True),
     ValueError, r"give it or \['paged_kv_cache'\], not both"),
    (lambda: AttentionSettings(emb_dim=16, num_query_heads=2, cache=StateCache()),
     ValueError, r"cache=StateCache.*allowed ContiguousCache\(...\) or PagedCache\(...\)"),
    # Each kind checks its own fields, naming the config key.
    (lambda: PagedCache(num_pages=0), ConfigError, r"num_pages: must be >= 1"),
    (lambda: ContiguousCache(ar_cache_axis_order=(0, 1, 1, 3)), ValueError,
     r"ar_cache_axis_order=\(0, 1, 1, 3\): must be a permutation"),
    (lambda: ContiguousCache(cache_axis_names=("b", "s")), ValueError,
     r"cache_axis_names=\('b', 's'\): need 4 logical names"),
    (lambda: PagedCache(kv_quant="int8"), ValueError, r"kv_quant='int8': must be a KVQuant"),
], ids=["paged-keywords-axis-order", "paged-config-axis-order", "paged-keywords-ring",
        "paged-config-ring", "config-ring-not-bool", "keywords-ring-not-bool", "spec-and-num_pages",
        "spec-and-config-paged_kv_cache", "state-cache-chosen", "paged-num_pages-0",
        "contiguous-axis-order", "contiguous-axis-names", "paged-kv_quant-str"])
def test_impossible_cache_combinations_raise_naming_the_keys(build, error, match):
  with pytest.raises(error, match=match):
    build()


def _layer(**keywords) -> Attention:
  return Attention(emb_dim=16, num_query_heads=2, num_kv_heads=1, rngs=nnx.Rngs(0), **keywords)


@pytest.mark.parametrize("args, name", [((2, 8.5), "max_length"), ((2, 0), "max_length"),
                                         ((2.0, 8), "batch_size"), ((True, 8), "batch_size"),
                                         ((0, 8), "batch_size")])
def test_init_cache_refuses_sizes_that_are_not_positive_integers(args, name):
  """Named before anything is built (a float reached an array shape; max_length=0 silently
  meant max_target_length); the layer keeps the cache it had."""
  layer = _layer()
  kept = layer.init_cache(2, 16)
  with pytest.raises(ValueError, match=rf"init_cache: {name} must be an integer >= 1"):
    layer.init_cache(*args)
  assert layer.cache is kept
  assert layer.init_cache(2, None).max_length == layer.settings.lengths.max_target_length


def test_init_cache_builds_the_tagged_kind():
  window = dict(mask=MaskSpec("local_sliding", window=4))
  layer = _layer(ar_cache_axis_order=(0, 2, 1, 3), prefill_cache_axis_order=(1, 0, 2, 3), **window)
  cache = layer.init_cache(2, 16)
  assert type(cache) is KVCache and cache.window == 4 and cache.capacity == 4  # the ring
  assert cache.axis_order == (0, 2, 1, 3) and cache.quant is None
  assert layer.init_cache(2, 16, for_prefill=True).axis_order == (1, 0, 2, 3)
  assert layer.init_cache(2, 16, ring_buffer=False).window is None
  assert _layer(sliding_window_ring_buffer=False, **window).init_cache(2, 16).capacity == 16
  # Unset and true are one choice, in one spelling in the record; false is the other.
  assert (_layer(sliding_window_ring_buffer=True, **window).settings
          == _layer(sliding_window_ring_buffer=None, **window).settings)
  assert _layer(sliding_window_ring_buffer=True, **window).settings.sliding_window_ring_buffer is None
  # Unset beside pages: the pool keeps every token (no contradiction, nothing dropped).
  assert type(_layer(paged_kv_cache=True, num_pages=6, tokens_per_page=4, **window)
              .init_cache(2, 16)) is PagedKVCache

  quant = KVQuant("int4", "heads_and_dkv")
  quantized = _layer(kv_quant=quant).init_cache(2, 16)
  assert type(quantized) is KVCache and quantized.quant == quant

  names = ("b", "s", "k", "h")
  paged = _layer(cache=PagedCache(num_pages=6, tokens_per_page=4, cache_axis_names=names,
                                  kv_quant=KVQuant("int8")), **window)
  pool = paged.init_cache(2, 16)
  assert type(pool) is PagedKVCache and (pool.num_pages, pool.tokens_per_page) == (6, 4)
  assert pool.axis_names == names and pool.quant == KVQuant("int8")
  assert type(paged.init_cache(2, 16, paged=False)) is KVCache  # init_cache may pick the kind
  # ... and a paged cache takes no contiguous-only argument.
  with pytest.raises(ValueError, match=r"init_cache\(ring_buffer=False\) with paged_kv_cache=True"):
    paged.init_cache(2, 16, ring_buffer=False)
  with pytest.raises(ValueError, match=r"init_cache\(for_prefill=True\) .* cache is paged"):
    paged.init_cache(2, 16, for_prefill=True)
  assert type(_layer(num_pages=6, tokens_per_page=4).init_cache(2, 16, paged=True)) is PagedKVCache


def test_axis_orders_with_paged_caches():
  """Only a decode-cache order with paged_kv_cache is a contradiction: a tuned contiguous
  layout still serves an Engine (init_cache(paged=True)), and a prefill order lays out the
  contiguous prefill cache whose sequences are inserted into the pages."""
  tuned = _layer(ar_cache_axis_order=(0, 2, 1, 3), prefill_cache_axis_order=(1, 0, 2, 3),
                 num_pages=6, tokens_per_page=4)
  assert type(tuned.init_cache(2, 16, paged=True)) is PagedKVCache  # what Engine asks for
  assert tuned.init_cache(2, 16).axis_order == (0, 2, 1, 3)  # the contiguous kind keeps it
  paged = _layer(prefill_cache_axis_order=(1, 0, 2, 3), paged_kv_cache=True, num_pages=6,
                 tokens_per_page=4)
  assert type(paged.init_cache(2, 16)) is PagedKVCache
  assert paged.init_cache(2, 16, paged=False, for_prefill=True).axis_order == (1, 0, 2, 3)
  from_config = load_config("tiny", "paged_kv_cache=true", "prefill_cache_axis_order=[1, 0, 2, 3]")
  assert AttentionSettings.from_config(from_config).cache.kind == "paged"
  # The decode order with paged_kv_cache is refused, keywords and config alike:
  # test_impossible_cache_combinations_raise_naming_the_keys.


def test_cache_spec_does_not_drop_the_configs_shared_cache_keys():
  """`cache=` replaces the config's kind, but quantization and axis names belong to every
  kind: a spec left at their defaults is an error naming the config key, not a silent drop."""
  int8 = load_config("tiny", "quantize_kvcache=true")
  with pytest.raises(ValueError, match=r"config sets quantize_kvcache .*kv_quant=KVQuant\("
                                       r".*set kv_quant=KVQuant\(.* in the spec"):
    AttentionSettings.from_config(int8, cache=PagedCache(num_pages=8))
  quant = AttentionSettings.from_config(int8).kv_quant
  kept = AttentionSettings.from_config(int8, cache=PagedCache(num_pages=8, kv_quant=quant))
  assert kept.cache == PagedCache(num_pages=8, kv_quant=quant)
  named = load_config("tiny", "cache_axis_names=[b, s, k, h]")
  with pytest.raises(ValueError, match=r"config sets cache_axis_names .*set cache_axis_names="):
    AttentionSettings.from_config(named, cache=ContiguousCache())
  # Keys of the kind itself are replaced, as documented.
  ordered = load_config("tiny", "ar_cache_axis_order=[0, 2, 1, 3]")
  assert AttentionSettings.from_config(ordered, cache=PagedCache(8)).cache == PagedCache(8)


def test_linear_layer_builds_its_state_whatever_the_kv_kind():
  """A hybrid config sets the KV keys for every layer; a linear layer keeps its state."""
  cfg = load_config("hybrid-linear", "emb_dim=32", "num_query_heads=2", "num_kv_heads=2",
                    "head_dim=16", "linear_decay_per_head=[]", "paged_kv_cache=true")
  linear = Attention(cfg, layer_idx=0, rngs=nnx.Rngs(0))
  softmax = Attention(cfg, layer_idx=3, rngs=nnx.Rngs(0))
  assert linear.settings.cache == StateCache() and type(linear.init_cache(2, 8)) is LinearStateCache
  assert type(linear.init_cache(2, 8, paged=False)) is LinearStateCache
  assert softmax.settings.cache.kind == "paged" and type(softmax.init_cache(2, 8)) is PagedKVCache


def test_decoder_init_cache_changes_nothing_when_a_layer_fails(monkeypatch):
  """A hybrid model builds every block's cache before keeping any: when a softmax layer's
  paged cache fails after the linear layers' states were built, every block keeps its cache."""
  from meshattn.layers import Decoder, cache_builder
  cfg = load_config("hybrid-linear", "emb_dim=32", "num_query_heads=2", "num_kv_heads=2",
                    "head_dim=16", "linear_decay_per_head=[]", "num_decoder_layers=4")
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  before = model.init_cache(2, 8)
  kinds = [type(c) for c in before]
  assert LinearStateCache in kinds and KVCache in kinds and kinds[-1] is KVCache

  def short_pool(*args, **kwargs):
    raise ValueError("page pool too small")
  monkeypatch.setattr(cache_builder, "PagedKVCache", short_pool)
  with pytest.raises(ValueError, match="page pool too small"):
    model.init_cache(2, 8, paged=True)
  assert all(a is b for a, b in zip(model.caches(), before, strict=True))


def test_settings_stay_static_jit_arguments():
  """Equal settings hash equal (one compile), replace rebuilds the specs, and a flat key
  changed by replace moves the typed spec with it."""
  paged = AttentionSettings(emb_dim=16, num_query_heads=2, cache=PagedCache(8, 4))
  again = AttentionSettings(emb_dim=16, num_query_heads=2, paged_kv_cache=True, num_pages=8,
                            tokens_per_page=4)
  assert paged == again and hash(paged) == hash(again)
  assert dataclasses.replace(paged, decode_attention="paged").cache == paged.cache
  assert dataclasses.replace(paged, num_pages=12).cache == PagedCache(12, 4)
  assert dataclasses.replace(paged, paged_kv_cache=False).cache == ContiguousCache()
  assert dataclasses.replace(paged, dropout_rate=0.5).kernel.dropout_rate == 0.5

  traces = []

  def scaled(x, settings):
    traces.append(settings)
    return x * settings.kernel.scale

  scaled = jax.jit(scaled, static_argnums=1)
  x = jnp.ones((2,))
  assert float(scaled(x, paged)[0]) == pytest.approx(8 ** -0.5)
  scaled(x, again)
  assert len(traces) == 1


def test_paged_decode_kernel_on_a_contiguous_cache_is_refused_at_init_cache():
  """Named at init_cache, not at the first decode step; a prefill cache (never decoded, its
  sequences go into pages) and a paged one stay allowed."""
  layer = _layer(decode_attention="paged", num_pages=6, tokens_per_page=4)
  with pytest.raises(ValueError, match=r"decode_attention='paged' reads a paged cache only.*"
                                       r"set paged_kv_cache true"):
    layer.init_cache(2, 16)
  assert layer.cache is None  # nothing was built or kept
  assert type(layer.init_cache(2, 16, paged=True)) is PagedKVCache
  assert type(layer.init_cache(2, 16, paged=False, for_prefill=True)) is KVCache


def test_a_kernel_refusal_names_the_config_key():
  layer = Attention(emb_dim=16, num_query_heads=2, attention="blockwise", dropout_rate=0.1,
                    rngs=nnx.Rngs(params=0, dropout=1))
  with pytest.raises(ValueError, match=r"^attention='blockwise' \(train mode\): .*dropout"):
    layer(jnp.ones((1, 4, 16)), deterministic=False)


def test_ring_off_beside_pages_still_lays_out_a_contiguous_cache():
  """`sliding_window_ring_buffer: false` with paged_kv_cache is kept (review): the contiguous
  caches init_cache(paged=False) builds from that layer keep every token."""
  window = dict(mask=MaskSpec("local_sliding", window=4))
  layer = _layer(paged_kv_cache=True, num_pages=6, tokens_per_page=4,
                 sliding_window_ring_buffer=False, **window)
  assert layer.settings.sliding_window_ring_buffer is False
  assert layer.init_cache(2, 16, paged=False).window is None
  assert layer.init_cache(2, 16, paged=False, for_prefill=True).window is None
  config = load_config("tiny", "paged_kv_cache=true", "sliding_window_ring_buffer=false",
                       "attention_type=local_sliding", "sliding_window_size=4")
  assert Attention(config, rngs=nnx.Rngs(0)).init_cache(2, 16, paged=False).window is None


def test_a_short_max_target_length_alone_is_enough_as_keywords():
  """The prefill limit's keyword default follows the target (min(1024, max_target_length));
  one given beyond it is refused, naming it."""
  assert AttentionSettings(emb_dim=16, num_query_heads=2,
                           max_target_length=64).max_prefill_predict_length == 64
  assert AttentionSettings(emb_dim=16, num_query_heads=2).max_prefill_predict_length == 1024
  with pytest.raises(ValueError, match=r"max_prefill_predict_length=100: must be in \[1, "
                                       r"max_target_length=64\]"):
    AttentionSettings(emb_dim=16, num_query_heads=2, max_target_length=64,
                      max_prefill_predict_length=100)
