"""The compiled decode step holds no copy of a cache-sized buffer (issue 14).

XLA:CPU used to copy the whole K cache after every layer's write at B >= 2 (kvp_jax/models/compile_options.py
says why); an XLA upgrade that brings the copies back fails here. The shapes are the smallest found that still
reproduce the copies without the options (at the tests' usual tiny config XLA fuses differently and never
copied); everything is lowered from abstract shapes, so no weights are allocated.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvp_jax.models import cache as kv_cache
from kvp_jax.models import decoder, generation
from kvp_jax.models import params as params_lib
from kvp_jax.models.config import tiny_config

CFG = tiny_config(num_layers=2, hidden_size=256, num_heads=8, num_kv_heads=4, head_dim=64, intermediate_size=512,
                  vocab_size=512, max_position_embeddings=1024)
SLOTS = 512


def cache_sized_copies(hlo_text: str, batch: int) -> list[tuple[int, ...]]:
  """Shapes of the `copy` instructions that materialise at least one layer's K or V ([B, K, S, H] elements).

  Only computations run as such count (the entry, while bodies): a `copy` inside a fusion body is a transpose
  within one kernel, not a buffer copy.
  """
  fused = set(re.findall(r"kind=k\w+, calls=(%[\w.\-]+)", hlo_text))
  layer = batch * CFG.num_kv_heads * SLOTS * CFG.head_dim
  found, computation = [], None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY\s+)?(%[\w.\-]+)\s.*\{\s*$", line)
    if head:
      computation = head.group(1)
      continue
    copy = re.search(r"=\s*[a-z0-9]+\[([\d,]*)\]\{[^}]*\}\s+copy\(", line)
    if copy and computation not in fused:
      dims = tuple(int(d) for d in copy.group(1).split(",") if d)
      if np.prod(dims) >= layer:
        found.append(dims)
  return found


def _abstract(batch: int):
  params = jax.eval_shape(lambda: params_lib.init(CFG, jax.random.PRNGKey(0)))
  cache = jax.eval_shape(lambda: kv_cache.empty(CFG, batch, SLOTS))
  return params, jax.ShapeDtypeStruct((batch, 1), jnp.int32), cache


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_decode_step_copies_no_cache_buffer(batch):
  params, tokens, cache = _abstract(batch)
  text = decoder.decode_step.lower(CFG, params, tokens, cache).compile().as_text()
  assert cache_sized_copies(text, batch) == []


def test_without_the_options_the_step_copies_the_cache():
  """The check above can fail: the same step compiled with XLA's defaults copies the K cache after writes."""
  params, tokens, cache = _abstract(8)
  plain = jax.jit(decoder.decode_step.__wrapped__, static_argnums=0, donate_argnums=3)
  copies = cache_sized_copies(plain.lower(CFG, params, tokens, cache).compile().as_text(), 8)
  assert copies and all(np.prod(c) >= np.prod(cache.k.shape) for c in copies), copies


def test_decode_loop_copies_no_cache_buffer():
  """generation's while loop runs the same step on a donated cache; with XLA's defaults it copied even at B=1."""
  params, _, cache = _abstract(1)
  text = generation._decode_loop.lower(
      CFG, params, jax.ShapeDtypeStruct((1, CFG.vocab_size), jnp.float32), cache, jax.random.PRNGKey(0),
      jnp.zeros((1,), jnp.int32), 0, 1.0, 1.0, sampling=generation.Sampling(), max_new_tokens=4).compile().as_text()
  assert cache_sized_copies(text, 1) == []


# ------------------------------------------------------------------------------------ rivals that write a cache


def _swiftkv(batch: int):
  from kvp_jax.baselines import swiftkv
  params, tokens, cache = _abstract(batch)
  skv = jax.eval_shape(lambda p: swiftkv.init_from_base(CFG, p, swiftkv.cutoff_layers(CFG.num_layers, 0.5)), params)
  return swiftkv, (CFG, params, skv, tokens, cache)


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_swiftkv_step_copies_no_cache_buffer(batch):
  """SwiftKV decodes with its own step (SwiftKV K/V written for every later layer): compiled as the base's."""
  swiftkv, args = _swiftkv(batch)
  assert cache_sized_copies(swiftkv.swiftkv_step.lower(*args).compile().as_text(), batch) == []
  if batch == 2:  # and the check can fail on it: XLA's defaults copy the cache after SwiftKV's writes
    plain = jax.jit(swiftkv.swiftkv_step.__wrapped__, static_argnums=0, donate_argnums=4)
    assert cache_sized_copies(plain.lower(*args).compile().as_text(), batch)


def test_specprefill_look_ahead_copies_no_cache_buffer():
  """SpecPrefill's draft decodes look_ahead - 1 tokens into its cache inside the prefill (a scan): with XLA's
  defaults each step copied the whole cache, at every batch size."""
  from kvp_jax.baselines import specprefill
  params, _, _ = _abstract(2)
  tokens = jax.ShapeDtypeStruct((2, SLOTS - 7), jnp.int32)  # the draft's cache: T + 7 look-ahead slots = SLOTS
  starts = jax.ShapeDtypeStruct((2,), jnp.int32)
  text = specprefill.specprefill_prefill.lower(CFG, params, CFG, params, tokens, starts, max_len=SLOTS + 8,
                                               keep=0.5).compile().as_text()
  assert cache_sized_copies(text, 2) == []
