"""Autoregressive generation: bucketed, left-padded prefill, then one jitted decode loop.

`generate` = pad prompts into a bucket -> jitted `decoder.prefill` -> `decode_from`. KV Prediction builds the
base's cache another way (auxiliary model + predictor) and calls `decode_from` with it directly.

Why buckets: prefill is compiled per prompt shape, so prompt lengths are padded up to a few static lengths
(powers of two from `DEFAULT_MIN_BUCKET`) and a stream of varied prompts compiles a handful of programs.
Why one loop: the whole decode runs inside a single `jit` (`lax.while_loop`, the cache donated), so there is no
per-token dispatch, and it exits as soon as every row has emitted a stop token.
Shape legend: see kvp_jax/models/config.py; here additionally n new tokens.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvp_jax.models import compile_options, decoder
from kvp_jax.models.cache import KVCache
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.params import Params

DEFAULT_MIN_BUCKET = 64

# Prefill compiled once per (cfg, batch, bucket, max_len); params are an argument, never a constant.
prefill_jit = jax.jit(decoder.prefill, static_argnums=0, static_argnames=("max_len", "all_logits", "chunk"))


def bucket_length(n: int, buckets: Sequence[int] | None = None, *, min_bucket: int = DEFAULT_MIN_BUCKET,
                  max_len: int | None = None) -> int:
  """The static length a prompt of n tokens is padded to: the smallest bucket >= n.

  buckets=None means powers of two from `min_bucket` (64, 128, 256, ...). A bucket beyond `max_len` is capped
  at max_len, so a prompt that fits the cache always gets a bucket.
  """
  if n < 1:
    raise ValueError(f"prompt length must be at least 1, got {n}")
  if max_len is not None and n > max_len:
    raise ValueError(f"a prompt of {n} tokens does not fit max_len={max_len}; raise max_len or shorten the prompt")
  if buckets is None:
    b = max(min_bucket, 1 << (n - 1).bit_length())
  else:
    fitting = [b for b in sorted(buckets) if b >= n]
    if not fitting and max_len is None:
      raise ValueError(f"a prompt of {n} tokens is longer than every bucket {tuple(buckets)}; add a larger bucket")
    b = fitting[0] if fitting else max_len
  return b if max_len is None else min(b, max_len)


def pad_prompts(prompts, pad_id: int, bucket: int):
  """Left-pads prompts (a list of token lists, or an int array [B, T]) to [B, bucket].

  Returns (tokens [B, bucket] int32, starts [B] int32): row b's first real token is at column starts[b], and
  every row's last token is in the last column.
  """
  rows = _as_rows(prompts)
  tokens = np.full((len(rows), bucket), pad_id, np.int32)
  starts = np.zeros((len(rows),), np.int32)
  for b, row in enumerate(rows):
    if len(row) > bucket:
      raise ValueError(f"prompt {b} has {len(row)} tokens, more than the bucket of {bucket}; use a larger bucket")
    starts[b] = bucket - len(row)
    tokens[b, starts[b]:] = row
  return tokens, starts


def _as_rows(prompts) -> list[np.ndarray]:
  if isinstance(prompts, (np.ndarray, jax.Array)):
    arr = np.asarray(prompts)
    if arr.ndim != 2:
      raise ValueError(f"prompt array must be [B, T], got shape {arr.shape}; wrap a single prompt as [prompt]")
    rows = list(arr)
  else:
    rows = [np.asarray(p) for p in prompts]
  if not rows:
    raise ValueError("no prompts given")
  for b, row in enumerate(rows):
    if row.ndim != 1 or row.size == 0 or not np.issubdtype(row.dtype, np.integer):
      raise ValueError(f"prompt {b} must be a non-empty sequence of integer token ids, got {row!r}")
  return [r.astype(np.int32) for r in rows]


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class Sampling:
  """The static part of the sampling rule (it selects code); temperature and top_p values are traced."""
  greedy: bool = True
  top_k: int | None = None
  nucleus: bool = False


def sample(logits_BV, key, sampling: Sampling, temperature, top_p):
  """Next tokens [B] int32: argmax, or temperature -> top-k -> top-p (nucleus) -> categorical draw."""
  if sampling.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  x_BV = logits_BV.astype(jnp.float32) / temperature
  if sampling.top_k is not None and sampling.top_k < x_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(x_BV, sampling.top_k)[0][:, -1:]
    x_BV = jnp.where(x_BV < kth_B1, -jnp.inf, x_BV)
  if sampling.nucleus:
    sorted_BV = jnp.sort(x_BV, axis=-1)[:, ::-1]
    p_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token while the mass strictly before it is below top_p: the most likely token is always kept.
    kept_B = jnp.sum((jnp.cumsum(p_BV, axis=-1) - p_BV) < top_p, axis=-1)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, (kept_B - 1)[:, None], axis=-1)
    x_BV = jnp.where(x_BV < cutoff_B1, -jnp.inf, x_BV)
  return jax.random.categorical(key, x_BV, axis=-1).astype(jnp.int32)


def _is_stop(tok_B, stop_S):
  return jnp.any(tok_B[:, None] == stop_S[None, :], axis=-1)


@compile_options.decode_jit(static_argnames=("cfg", "sampling", "max_new_tokens"), donate_argnames=("cache",))
def _decode_loop(cfg: ModelConfig, params: Params, first_logits_BV, cache: KVCache, key, stop_S, pad_id,
                 temperature, top_p, *, sampling: Sampling, max_new_tokens: int):
  """Samples token 0 from first_logits, then feeds each token back until n tokens or every row stopped.

  Returns (tokens [B, n] with pad_id after a row's stop token and beyond the steps taken, steps, cache).
  """
  B = first_logits_BV.shape[0]

  def pick(logits_BV, key):
    key, sub = jax.random.split(key)
    return sample(logits_BV, sub, sampling, temperature, top_p), key

  tok_B, key = pick(first_logits_BV, key)
  out_Bn = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(tok_B)

  def cond(state):
    i, _, _, _, _, done_B = state
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(state):
    i, tok_B, cache, key, out_Bn, done_B = state
    logits_BV, cache = decoder.forward(cfg, params, tok_B[:, None], None, cache, all_logits=False)
    nxt_B, key = pick(logits_BV, key)
    nxt_B = jnp.where(done_B, pad_id, nxt_B)  # finished rows keep emitting pad
    out_Bn = jax.lax.dynamic_update_slice(out_Bn, nxt_B[:, None], (jnp.zeros((), jnp.int32), i))
    return i + 1, nxt_B, cache, key, out_Bn, done_B | _is_stop(nxt_B, stop_S)

  init = (jnp.ones((), jnp.int32), tok_B, cache, key, out_Bn, _is_stop(tok_B, stop_S))
  steps, _, cache, _, out_Bn, _ = jax.lax.while_loop(cond, body, init)
  return out_Bn, steps, cache


# ----------------------------------------------------------------------------- decoding


class Decoded(NamedTuple):
  tokens: jax.Array  # [B, n] int32, n <= max_new_tokens (fewer when every row stopped early)
  cache: KVCache  # holds every generated token but the last


def _sampling(greedy, temperature, top_k, top_p, key) -> Sampling:
  if greedy:
    if top_k is not None or top_p is not None or temperature != 1.0:
      raise ValueError("temperature/top_k/top_p only apply when sampling; pass greedy=False (and a key)")
    return Sampling()
  if key is None:
    raise ValueError("sampling (greedy=False) needs an explicit PRNG key, e.g. key=jax.random.key(0)")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}; use greedy=True for argmax decoding")
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k must be >= 1, got {top_k}")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  return Sampling(greedy=False, top_k=top_k, nucleus=top_p is not None)


def _check_positions(cfg: ModelConfig, longest: int, max_new_tokens: int):
  if longest + max_new_tokens > cfg.max_position_embeddings:
    raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                     f"max_position_embeddings={cfg.max_position_embeddings}; shorten the prompt or generate less")


def check_request(cfg: ModelConfig, rows: Sequence[np.ndarray], max_new_tokens: int, max_len: int | None = None):
  """One-line ValueErrors for a generation request that cannot run: ids outside the vocabulary (JAX would
  clamp the gather silently), no tokens asked for, or prompts that overrun the model's positions or the cache."""
  for b, r in enumerate(rows):
    if r.min() < 0 or r.max() >= cfg.vocab_size:
      raise ValueError(f"prompt {b} has token ids outside [0, vocab_size={cfg.vocab_size})")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  longest = max(len(r) for r in rows)
  _check_positions(cfg, longest, max_new_tokens)
  if max_len is not None:
    if longest > max_len:
      raise ValueError(f"prompt of {longest} tokens is longer than the cache (max_len={max_len}); "
                       "raise max_len or shorten the prompt")
    if longest + max_new_tokens > max_len:
      raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} does not fit the cache "
                       f"(max_len={max_len}); raise max_len or lower max_new_tokens")


def decode_from(cfg: ModelConfig, params: Params, first_logits, cache: KVCache, max_new_tokens: int, *,
                greedy: bool = True, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, key=None, stop_tokens: Sequence[int] = (),
                pad_id: int = 0) -> Decoded:
  """Generates from a filled cache and the logits [B, V] of the first new token.

  The cache may come from `decoder.prefill` or from KV Prediction; it is donated (its buffers are reused), so
  do not use it afterwards. It needs max_new_tokens - 1 free slots (the last token is never written).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  sampling = _sampling(greedy, temperature, top_k, top_p, key)
  B, V = first_logits.shape
  if B != cache.batch or V != cfg.vocab_size:
    raise ValueError(f"first_logits has shape {first_logits.shape}; expected [batch={cache.batch}, "
                     f"vocab={cfg.vocab_size}] to match the cache and config")
  end, longest = int(cache.end), int(jnp.max(cache.lengths()))
  if end + max_new_tokens - 1 > cache.max_len:
    raise ValueError(f"the cache has {cache.max_len - end} free slots but max_new_tokens={max_new_tokens} needs "
                     f"{max_new_tokens - 1}; build the cache with max_len >= {end + max_new_tokens - 1}")
  _check_positions(cfg, longest, max_new_tokens)
  key = jax.random.key(0) if key is None else key  # unused by greedy decoding
  tokens, steps, cache = _decode_loop(
      cfg, params, first_logits, cache, key, jnp.asarray(list(stop_tokens), jnp.int32).reshape(-1),
      jnp.asarray(pad_id, jnp.int32), jnp.asarray(temperature, jnp.float32),
      jnp.asarray(1.0 if top_p is None else top_p, jnp.float32), sampling=sampling, max_new_tokens=max_new_tokens)
  return Decoded(tokens[:, :int(steps)], cache)


def generate(cfg: ModelConfig, params: Params, prompt_ids, max_new_tokens: int, *, greedy: bool = True,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, key=None,
             stop_tokens: Sequence[int] = (), pad_id: int = 0, max_len: int | None = None,
             return_padded: bool = False, buckets: Sequence[int] | None = None):
  """Generates up to max_new_tokens after each prompt.

  prompt_ids: an int array [B, T] (every row a full prompt) or a list of token lists of any lengths.
  Returns, for an array, ids [B, T + n] (prompt first, pad_id after a row's stop token); for a list, a list of
  lists (prompt + new tokens up to and including the first stop token). n < max_new_tokens only when every
  row stopped. return_padded=True returns (ids [B, bucket + n] left-padded, starts [B]) instead.
  max_len: cache slots (default bucket + max_new_tokens). Stops only on `stop_tokens` (pass cfg.eos_token_id
  to stop at EOS). Compiles once per (batch, bucket, cache length, max_new_tokens, sampling rule).
  """
  is_array = isinstance(prompt_ids, (np.ndarray, jax.Array))
  rows = _as_rows(prompt_ids)
  longest = max(len(r) for r in rows)
  check_request(cfg, rows, max_new_tokens, max_len)  # before prefill, so a bad request costs no compile
  _sampling(greedy, temperature, top_k, top_p, key)
  bucket = bucket_length(longest, buckets, max_len=None if max_len is None else max_len - max_new_tokens)
  cache_len = bucket + max_new_tokens if max_len is None else max_len
  tokens, starts = pad_prompts(rows, pad_id, bucket)
  first_logits, cache = prefill_jit(cfg, params, jnp.asarray(tokens), jnp.asarray(starts), max_len=cache_len)
  new = np.asarray(decode_from(cfg, params, first_logits, cache, max_new_tokens, greedy=greedy,
                               temperature=temperature, top_k=top_k, top_p=top_p, key=key,
                               stop_tokens=stop_tokens, pad_id=pad_id).tokens)
  if return_padded:
    return np.concatenate([tokens, new], axis=1), starts
  if is_array:
    return np.concatenate([np.stack(rows), new], axis=1)
  stops = set(int(s) for s in stop_tokens)
  out = []
  for row, gen in zip(rows, new.tolist()):
    hit = next((j for j, t in enumerate(gen) if t in stops), None)
    out.append(row.tolist() + (gen if hit is None else gen[:hit + 1]))
  return out
