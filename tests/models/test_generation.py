"""Generation (no torch): greedy vs argmax rollout, ragged batches, stop tokens, sampling, limits, buckets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvp_jax.models import decoder, generation
from kvp_jax.models import params as params_lib
from kvp_jax.models.config import ModelConfig, tiny_config
from kvp_jax.models.generation import bucket_length, decode_from, generate, pad_prompts

from helpers import random_params

CFG = tiny_config(max_position_embeddings=128)
NEW = 8  # one max_new_tokens for most tests, so they share compiled programs

logits_jit = jax.jit(decoder.logits, static_argnums=0)


@functools.lru_cache(maxsize=None)
def params():
  return random_params(CFG)


def prompt(n: int, seed: int | None = None) -> list[int]:
  return np.random.default_rng(n if seed is None else seed).integers(0, CFG.vocab_size, n).tolist()


def argmax_rollout(prompt_ids: list[int], n: int, width: int = 64) -> list[int]:
  """Greedy continuation from the plain forward pass, no cache: right padding never reaches earlier logits."""
  x = np.zeros((1, width), np.int32)
  x[0, :len(prompt_ids)] = prompt_ids
  length = len(prompt_ids)
  for _ in range(n):
    x[0, length] = int(jnp.argmax(logits_jit(CFG, params(), jnp.asarray(x))[0, length - 1]))
    length += 1
  return x[0, :length].tolist()


def test_bucket_length():
  assert [bucket_length(n) for n in (1, 5, 64, 65, 3000)] == [64, 64, 64, 128, 4096]
  assert bucket_length(70, max_len=100) == 100  # capped at the cache, never below the prompt
  assert bucket_length(9, buckets=(8, 16, 32)) == 16
  with pytest.raises(ValueError, match="does not fit max_len"):
    bucket_length(101, max_len=100)
  with pytest.raises(ValueError, match="longer than every bucket"):
    bucket_length(33, buckets=(8, 16, 32))


def test_pad_prompts_left_pads():
  tokens, starts = pad_prompts([[1, 2], [3, 4, 5]], pad_id=9, bucket=4)
  np.testing.assert_array_equal(tokens, [[9, 9, 1, 2], [9, 3, 4, 5]])
  np.testing.assert_array_equal(starts, [2, 1])
  tokens, starts = pad_prompts(np.array([[1, 2, 3]]), pad_id=0, bucket=3)
  np.testing.assert_array_equal(starts, [0])
  with pytest.raises(ValueError, match="more than the bucket"):
    pad_prompts([[1, 2, 3]], 0, bucket=2)


def test_greedy_equals_argmax_rollout():
  prompts = np.array([prompt(11, seed=1), prompt(11, seed=2)])
  out = generate(CFG, params(), prompts, NEW)
  assert out.shape == (2, 11 + NEW)
  for b in range(2):
    assert out[b].tolist() == argmax_rollout(prompts[b].tolist(), NEW), f"row {b}"


def test_ragged_batch_equals_each_prompt_alone():
  prompts = [prompt(3), prompt(17), prompt(40)]
  batch = generate(CFG, params(), prompts, NEW)
  assert isinstance(batch, list) and [len(r) for r in batch] == [3 + NEW, 17 + NEW, 40 + NEW]
  for b, p in enumerate(prompts):
    assert batch[b][:len(p)] == p
    assert batch[b] == generate(CFG, params(), [p], NEW)[0], f"prompt {b}"
  ids, starts = generate(CFG, params(), prompts, NEW, return_padded=True, pad_id=7)
  assert ids.shape == (3, 64 + NEW) and starts.tolist() == [61, 47, 24]
  assert [ids[b, s:].tolist() for b, s in enumerate(starts)] == batch and (ids[0, :61] == 7).all()


def test_stop_tokens():
  prompts = [prompt(3), prompt(17)]
  free = generate(CFG, params(), prompts, NEW)
  new0 = free[0][3:]
  j = next(j for j in range(1, NEW) if new0[j] not in new0[:j])  # a token first produced at step j > 0
  stop = new0[j]
  stopped = generate(CFG, params(), prompts, NEW, stop_tokens=(stop,))
  assert stopped[0] == free[0][:3 + j + 1], "row 0 ends right after its stop token"
  hit1 = next((k for k, t in enumerate(free[1][17:]) if t == stop), NEW - 1)
  assert stopped[1] == free[1][:17 + hit1 + 1], "row 1 runs on until its own stop token"
  # As an array: rows that stopped emit pad_id; when every row has stopped the loop ends early.
  arr = generate(CFG, params(), np.array([prompts[0]]), NEW, stop_tokens=(stop,), pad_id=-1)
  assert arr.tolist() == [free[0][:3 + j + 1]] and arr.shape[1] < 3 + NEW
  padded = generate(CFG, params(), np.array(prompts[0:1] * 2), NEW, stop_tokens=(stop, 10_000), pad_id=-1)
  assert padded.shape == (2, 3 + j + 1)


def test_sampling_is_deterministic_given_key_and_varies_across_keys():
  prompts = [prompt(5), prompt(9)]
  run = lambda seed: generate(CFG, params(), prompts, NEW, greedy=False, temperature=2.0,
                              key=jax.random.key(seed))
  assert run(1) == run(1)
  assert run(1) != run(2)
  assert generate(CFG, params(), prompts, NEW, greedy=False, top_k=40, top_p=0.9, key=jax.random.key(1)) != \
      generate(CFG, params(), prompts, NEW, greedy=False, top_k=40, top_p=0.9, key=jax.random.key(2))


def test_top_k_1_and_tiny_top_p_equal_greedy():
  prompts = [prompt(5), prompt(9)]
  greedy = generate(CFG, params(), prompts, NEW)
  assert generate(CFG, params(), prompts, NEW, greedy=False, top_k=1, key=jax.random.key(3)) == greedy
  assert generate(CFG, params(), prompts, NEW, greedy=False, top_p=1e-6, key=jax.random.key(3)) == greedy


def test_bad_requests_raise_one_clear_error():
  p = params()
  with pytest.raises(ValueError, match="needs an explicit PRNG key"):
    generate(CFG, p, [prompt(5)], NEW, greedy=False)
  with pytest.raises(ValueError, match="only apply when sampling"):
    generate(CFG, p, [prompt(5)], NEW, top_k=3)
  with pytest.raises(ValueError, match="longer than the cache"):
    generate(CFG, p, [prompt(20)], NEW, max_len=16)
  with pytest.raises(ValueError, match="does not fit the cache"):
    generate(CFG, p, [prompt(10)], NEW, max_len=16)
  with pytest.raises(ValueError, match="max_position_embeddings=128"):
    generate(CFG, p, [prompt(100)], 40)
  with pytest.raises(ValueError, match="outside"):
    generate(CFG, p, [[1, CFG.vocab_size]], NEW)
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    generate(CFG, p, np.array(prompt(5)), NEW)


def test_decode_from_a_precomputed_cache():
  """KV Prediction's path: any filled cache + first logits -> the base's decode loop."""
  p = params()
  prompts = [prompt(6), prompt(13)]
  tokens, starts = pad_prompts(prompts, 0, 16)
  first, cache = generation.prefill_jit(CFG, p, jnp.asarray(tokens), jnp.asarray(starts), max_len=16 + NEW)
  out = decode_from(CFG, p, first, cache, NEW)
  assert out.tokens.shape == (2, NEW) and int(out.cache.end) == 16 + NEW - 1
  want = generate(CFG, p, prompts, NEW)
  assert [r[len(q):] for r, q in zip(want, prompts)] == np.asarray(out.tokens).tolist()
  first, cache = generation.prefill_jit(CFG, p, jnp.asarray(tokens), jnp.asarray(starts), max_len=16)
  with pytest.raises(ValueError, match="free slots"):
    decode_from(CFG, p, first, cache, NEW)


def test_bucketing_compiles_prefill_once_per_bucket():
  cfg = CFG.replace(rms_norm_eps=1e-5)  # a config no other test compiled for
  p = params()
  sizes = lambda: (generation.prefill_jit._cache_size(), generation._decode_loop._cache_size())
  before = sizes()
  for n in range(5, 61):
    generate(cfg, p, [prompt(n)], 2, buckets=(16, 32, 64))
  after = sizes()
  assert after[0] - before[0] == 3, "prefill compiled once per bucket (16, 32, 64)"
  assert after[1] - before[1] == 3, "the decode loop compiled once per bucket"
  for n in (7, 30, 61):  # default buckets: all of these pad to 64
    generate(cfg, p, [prompt(n)], 2)
  assert sizes()[0] - after[0] <= 1
