"""Least-squares predictor initialisation: recovers a known linear map from chunked moments, and on a tiny model
predicts the base's K/V on held-out tokens better than the identity start."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from kvp_jax.kvp import aux_models, inference, lstsq
from kvp_jax.models.config import tiny_config


def test_chunked_moments_recover_a_linear_map_and_bias():
  rng = np.random.default_rng(0)
  I, O, A = 6, 5, 2
  layer_map = (0, 0, 1)  # two base layers read aux feature 0, one reads feature 1
  w_true = rng.standard_normal((len(layer_map), I, O))
  b_true = rng.standard_normal((len(layer_map), O))
  m = lstsq.Moments(*(np.zeros(s) for s in [(A, I + 1, I + 1)] * 2 + [(3, I + 1, O)] * 2 + [(3,)] * 2))
  for chunk in range(3):  # three chunks, the second with masked rows holding garbage targets
    xs = [rng.standard_normal((40, I)) for _ in range(A)]
    mask = np.ones(40, bool)
    if chunk == 1:
      mask[25:] = False
    ys = [xs[a] @ w_true[i] + b_true[i] for i, a in enumerate(layer_map)]
    ys = [np.where(mask[:, None], y, 1e3) for y in ys]
    targets = [(a, jnp.asarray(y), jnp.asarray(2 * y)) for a, y in zip(layer_map, ys)]
    m.add(jax.device_get(lstsq.chunk_moments_from([jnp.asarray(x) for x in xs], [jnp.asarray(x) for x in xs],
                                                  targets, jnp.asarray(mask))))
  assert m.count == 40 + 25 + 40
  wk, bk, wv, bv, r2k, r2v = lstsq.solve(m, layer_map, ridge=1e-9)
  np.testing.assert_allclose(wk, w_true, atol=1e-4)
  np.testing.assert_allclose(bk, b_true, atol=1e-4)
  np.testing.assert_allclose(wv, 2 * w_true, atol=1e-4)
  np.testing.assert_allclose(r2k, 1.0, atol=1e-6)
  # a strong ridge shrinks the weights, never the bias, and explains less
  wk2, bk2, *_, r2k2, _ = lstsq.solve(m, layer_map, ridge=10.0)
  assert np.linalg.norm(wk2) < 0.5 * np.linalg.norm(wk)
  assert (r2k2 < r2k).all()


def _kv_error(kcfg, base, kp, tokens):
  starts = jnp.zeros((tokens.shape[0],), jnp.int32)
  pred, true = inference.predicted_and_true_cache(kcfg, base, kp, tokens, starts, tokens.shape[1])
  err = inference.layer_errors(pred, true)
  return np.asarray(err["k"]), np.asarray(err["v"])


@pytest.mark.parametrize("kind", ["kv", "activation"])
def test_lstsq_lowers_held_out_kv_error_below_identity_on_a_tiny_model(kind):
  cfg = tiny_config(num_layers=4, vocab_size=64)
  base = random_params(cfg, seed=1)
  kcfg, kp = inference.build(cfg, base, aux_models.AuxSpec(kind="lp", lp_keep_fraction=0.5), kind=kind,
                             init="identity" if kind == "kv" else "random")
  key = jax.random.PRNGKey(5)
  fit_batches = [jax.random.randint(jax.random.fold_in(key, i), (4, 32), 0, cfg.vocab_size) for i in range(4)]
  held_out = jax.random.randint(jax.random.fold_in(key, 99), (4, 32), 0, cfg.vocab_size)
  pred, summary = lstsq.fit(kcfg, base, kp.aux, iter(fit_batches), num_tokens=3 * 128, ridge=1e-3)
  assert summary["tokens"] == 3 * 128  # stops after the chunk that reaches num_tokens
  assert len(summary["r2_k"]) == cfg.num_layers and min(summary["r2_k"]) > 0
  k0, v0 = _kv_error(kcfg, base, kp, held_out)
  k1, v1 = _kv_error(kcfg, base, kp.replace(pred=pred), held_out)
  assert k1.mean() < 0.8 * k0.mean() and v1.mean() < 0.8 * v0.mean(), (k0, k1, v0, v1)
  if kind == "kv":  # base layer 0 reads the aux's own copy of it, so its K/V are exact either way
    assert k1[0] < 1e-2 and v1[0] < 1e-2


def test_lstsq_needs_tokens():
  cfg = tiny_config(num_layers=2, vocab_size=64)
  base = random_params(cfg)
  kcfg, kp = inference.build(cfg, base)
  with pytest.raises(ValueError, match="no fitting tokens"):
    lstsq.fit(kcfg, base, kp.aux, iter([]), num_tokens=10)
  with pytest.raises(ValueError, match="at least one"):
    lstsq.fit(kcfg, base, kp.aux, iter([]), num_tokens=0)
