"""attention.py against a naive float64 reference: GQA, MHA, left padding, chunking, masked (cached) attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvp_jax.models import attention


def _naive(q_BTNH, k_BKSH, v_BKSH, mask_BTS):
  """Dense softmax attention in float64 with a boolean mask; rows with no visible key are NaN."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_BTNH, k_BKSH, v_BKSH))
  B, T, N, H = q.shape
  K = k.shape[1]
  qg = q.reshape(B, T, K, N // K, H)
  s = np.einsum("BTKGH,BKSH->BKGTS", qg, k) / np.sqrt(H)
  s = np.where(np.asarray(mask_BTS)[:, None, None], s, -np.inf)
  with np.errstate(invalid="ignore"):
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
  o = np.einsum("BKGTS,BKSH->BTKGH", p, v)
  return o.reshape(B, T, N, H)


def _inputs(B, T, N, K, H, seed=0):
  r = np.random.default_rng(seed)
  q = r.standard_normal((B, T, N, H)).astype(np.float32)
  k = r.standard_normal((B, K, T, H)).astype(np.float32)
  v = r.standard_normal((B, K, T, H)).astype(np.float32)
  return q, k, v


def _positions(T, starts):
  return np.arange(T, dtype=np.int32)[None, :] - np.asarray(starts, np.int32)[:, None]


@pytest.mark.parametrize("N,K", [(8, 2), (4, 4), (6, 1)])
@pytest.mark.parametrize("T,chunk", [(50, 16), (64, 64), (40, None), (300, None), (33, 7)])
def test_causal_self_attention_matches_naive(N, K, T, chunk):
  B, H = 3, 16
  q, k, v = _inputs(B, T, N, K, H)
  pos = _positions(T, [0, 5, T - 3])  # left padding of 0, 5 and all but 3 tokens
  out = np.asarray(jax.jit(attention.causal_self_attention, static_argnums=4)(q, k, v, pos, chunk))
  ref = _naive(q, k, v, attention.causal_mask(pos, pos))
  real = pos >= 0
  np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=1e-5)
  assert np.isfinite(out).all(), "padding query rows must stay finite (NaN there would poison later layers)"


def test_causal_self_attention_large_scores_and_long_padding():
  """Left padding longer than a chunk: the first chunks of that row hold no visible key at all."""
  B, T, N, K, H = 2, 96, 4, 2, 8
  q, k, v = _inputs(B, T, N, K, H, seed=1)
  q *= 30.0  # peaked softmax: the max subtraction must be per row, not global
  pos = _positions(T, [0, 70])
  out = np.asarray(attention.causal_self_attention(q, k, v, pos, 16))
  ref = _naive(q, k, v, attention.causal_mask(pos, pos))
  real = pos >= 0
  np.testing.assert_allclose(out[real], ref[real], atol=1e-5, rtol=1e-5)
  assert np.isfinite(out).all()


@pytest.mark.parametrize("T", [1, 5])
def test_masked_attention_matches_naive(T):
  B, S, N, K, H = 2, 40, 8, 2, 16
  r = np.random.default_rng(2)
  q = r.standard_normal((B, T, N, H)).astype(np.float32)
  k = r.standard_normal((B, K, S, H)).astype(np.float32)
  v = r.standard_normal((B, K, S, H)).astype(np.float32)
  mask = r.random((B, T, S)) < 0.6
  mask[..., 0] = True
  out = np.asarray(jax.jit(attention.masked_attention)(q, k, v, mask))
  np.testing.assert_allclose(out, _naive(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_masked_attention_fully_masked_row_is_finite():
  q, k, v = _inputs(1, 4, 4, 2, 8)
  mask = np.zeros((1, 4, 4), bool)
  mask[0, 1:, 0] = True
  out = np.asarray(attention.masked_attention(q, k, v, mask))
  assert np.isfinite(out).all()
  np.testing.assert_allclose(out[0, 1:], _naive(q, k, v, mask)[0, 1:], atol=1e-5, rtol=1e-5)


def test_chunked_equals_unchunked_for_real_rows():
  B, T, N, K, H = 2, 70, 4, 2, 8
  q, k, v = _inputs(B, T, N, K, H, seed=3)
  pos = _positions(T, [0, 9])
  a = np.asarray(attention.causal_self_attention(q, k, v, pos, 8))
  b = np.asarray(attention.causal_self_attention(q, k, v, pos, T))
  real = pos >= 0
  np.testing.assert_allclose(a[real], b[real], atol=1e-5, rtol=1e-5)


def test_bfloat16_close_to_float32():
  B, T, N, K, H = 1, 64, 4, 2, 32
  q, k, v = _inputs(B, T, N, K, H, seed=4)
  pos = _positions(T, [0])
  f32 = np.asarray(attention.causal_self_attention(q, k, v, pos))
  bf = attention.causal_self_attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), pos)
  assert bf.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf, np.float32), f32, atol=5e-2)


@pytest.mark.parametrize("T,expected", [(1, 1), (100, 100), (128, 128), (2048, 128), (2049, 256), (4096, 256)])
def test_auto_chunk(T, expected):
  assert attention.auto_chunk(T) == expected
