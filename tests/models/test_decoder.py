"""The decoder on its own (no torch): cache vs no cache, padding, jit, causality, shapes at 1B scale."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvp_jax.models import decoder
from kvp_jax.models import params as params_lib
from kvp_jax.models.config import ModelConfig, RopeScaling, tiny_config

from helpers import random_params

CONFIGS = {
    "llama_gqa2": tiny_config(),
    "qwen2_bias_tied": tiny_config(architecture="qwen2", attention_bias=True, tie_word_embeddings=True,
                                   num_kv_heads=4),
    "qwen3_qknorm_llama3rope": tiny_config(architecture="qwen3", qk_norm=True, head_dim=24, num_kv_heads=1,
                                           num_layers=3, rope_scaling=RopeScaling(original_max_position_embeddings=16)),
}

logits_jit = jax.jit(decoder.logits, static_argnums=0)
prefill_jit = jax.jit(decoder.prefill, static_argnums=0, static_argnames=("max_len", "all_logits"))
forward_jit = jax.jit(decoder.forward, static_argnums=0, static_argnames=("all_logits",))


@functools.lru_cache(maxsize=None)
def setup(name: str):
  cfg = CONFIGS[name]
  return cfg, random_params(cfg, seed=len(name))


def tokens(cfg, shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, shape), jnp.int32)


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_then_cached_decode_equals_full_forward(name):
  cfg, p = setup(name)
  toks = tokens(cfg, (2, 24))
  full = logits_jit(cfg, p, toks)
  last, cache = prefill_jit(cfg, p, toks[:, :16], max_len=32)
  assert max_diff(last, full[:, 15]) < 1e-5
  for t in range(16, 24):
    step, cache = decoder.decode_step(cfg, p, toks[:, t:t + 1], cache)
    assert max_diff(step, full[:, t]) < 1e-5, f"decode step at position {t}"
  assert int(cache.end) == 24


def test_padded_batch_equals_rows_alone():
  cfg, p = setup("qwen3_qknorm_llama3rope")
  rows = [np.asarray(tokens(cfg, (n,), seed=n)) for n in (5, 12)]
  padded = np.zeros((2, 16), np.int32)
  starts = np.array([16 - len(r) for r in rows], np.int32)
  for b, r in enumerate(rows):
    padded[b, starts[b]:] = r
  last, cache = prefill_jit(cfg, p, jnp.asarray(padded), jnp.asarray(starts), max_len=24)
  alone = [prefill_jit(cfg, p, jnp.asarray(r[None]), max_len=24) for r in rows]
  for b in range(2):
    assert max_diff(last[b], alone[b][0][0]) < 1e-5, f"prefill logits of row {b}"
  nxt = tokens(cfg, (2, 4), seed=99)
  caches = [c for _, c in alone]
  for t in range(4):
    step, cache = decoder.decode_step(cfg, p, nxt[:, t:t + 1], cache)
    for b in range(2):
      step_b, caches[b] = decoder.decode_step(cfg, p, nxt[b:b + 1, t:t + 1], caches[b])
      assert max_diff(step[b], step_b[0]) < 1e-5, f"decode step {t} of row {b}"


def test_jit_equals_no_jit():
  cfg, p = setup("qwen2_bias_tied")
  toks = tokens(cfg, (2, 12))
  assert max_diff(decoder.logits(cfg, p, toks), logits_jit(cfg, p, toks)) < 1e-5


def test_causality():
  cfg, p = setup("llama_gqa2")
  toks = tokens(cfg, (1, 20))
  changed = toks.at[0, 12].set((toks[0, 12] + 1) % cfg.vocab_size)
  a, b = logits_jit(cfg, p, toks), logits_jit(cfg, p, changed)
  assert max_diff(a[:, :12], b[:, :12]) == 0.0, "a later token changed an earlier logit"
  assert max_diff(a[:, 12:], b[:, 12:]) > 1e-3, "the changed token changed nothing (test is vacuous)"


def test_forward_with_cache_equals_prefill_chunks():
  cfg, p = setup("llama_gqa2")
  toks = tokens(cfg, (2, 24))
  starts = jnp.asarray([0, 5], jnp.int32)  # row 1 is left-padded
  whole, _ = prefill_jit(cfg, p, toks, starts, max_len=24, all_logits=True)
  first, cache = prefill_jit(cfg, p, toks[:, :10], starts, max_len=24, all_logits=True)
  mid, cache = forward_jit(cfg, p, toks[:, 10:17], None, cache)
  last, cache = forward_jit(cfg, p, toks[:, 17:], None, cache)
  chunked = jnp.concatenate([first, mid, last], axis=1)
  assert max_diff(chunked[0], whole[0]) < 1e-5
  assert max_diff(chunked[1, 5:], whole[1, 5:]) < 1e-5  # padding columns hold no meaningful logits
  assert max_diff(whole[0], logits_jit(cfg, p, toks[:1])[0]) < 1e-5
  assert max_diff(whole[1, 5:], logits_jit(cfg, p, toks[1:, 5:])[0]) < 1e-5


LLAMA_3_2_1B = ModelConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
    head_dim=64, rope_theta=500000.0, rope_scaling=RopeScaling(factor=32.0), rms_norm_eps=1e-5,
    tie_word_embeddings=True, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=(128001,))


def test_eval_shape_llama_3_2_1b_allocates_nothing():
  cfg = LLAMA_3_2_1B
  abstract = jax.eval_shape(lambda k: params_lib.init(cfg, k, jnp.bfloat16), jax.random.key(0))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  assert n == cfg.num_params() == 1_235_814_400  # Llama-3.2-1B's published parameter count
  assert abstract.layers[0].wk.shape == (2048, 8, 64) and abstract.lm_head is None
  toks = jax.ShapeDtypeStruct((2, 32), jnp.int32)
  out = jax.eval_shape(lambda p, t: decoder.logits(cfg, p, t), abstract, toks)
  assert out.shape == (2, 32, 128256) and out.dtype == jnp.float32
  last, cache = jax.eval_shape(lambda p, t: decoder.prefill(cfg, p, t, None, 64), abstract, toks)
  assert last.shape == (2, 128256) and cache.k.shape == (16, 2, 8, 64, 64) and cache.k.dtype == jnp.bfloat16
