"""Selective recomputation: window rules, budget bucketing, and its two limits (zero budget = KV Prediction,
full budget = the base's own prefill)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvp_jax.baselines import recompute
from kvp_jax.kvp import aux_models, inference, predictor
from kvp_jax.kvp.flops import kvp_flops
from kvp_jax.models import decoder, generation
from kvp_jax.models import params as P
from kvp_jax.models.config import tiny_config
from kvp_jax.ttft import method as ttft

T, MAX_LEN = 24, 32


@pytest.fixture(scope="module")
def setup():
  # A random predictor, so the predicted cache is far from the base's and only recomputation can repair it.
  cfg = tiny_config(num_layers=3)
  base = P.init(cfg, jax.random.PRNGKey(0))
  keep = tuple(range(cfg.num_layers))
  aux_cfg, aux = aux_models.prune_layers(cfg, base, keep)
  kcfg = predictor.KVPConfig(cfg, aux_cfg, "kv", aux_models.lp_layer_map(cfg.num_layers, keep))
  kp = inference.KVPParams(aux, predictor.init(kcfg, jax.random.PRNGKey(3), how="random"))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, T), 3, cfg.vocab_size)
  starts = jnp.array([0, 5], jnp.int32)
  return cfg, base, kcfg, kp, tokens, starts


def _runs(mask_row):
  return recompute.intervals(np.asarray(mask_row))


def test_windows_edges_merge_and_padding():
  P_ = 40  # T = 41: edges of ceil(4.1) = 5 tokens; the tail edge's last token is the base's own step
  imp = np.full((2, P_), 0.01, np.float32)
  imp[0, [10, 14, 20, 23]] = [5, 4, 3, 2]  # windows [8,12)+[12,16) touch, [18,22)+[21,25) overlap
  imp[0, 2] = 9.0  # inside the head edge: never a window centre
  imp[1, :10] = 99.0  # row 1 is left-padded by 10: padding is never chosen, however "important"
  imp[1, 30] = 5.0
  m = np.asarray(recompute.chosen_mask(jnp.asarray(imp), jnp.array([0, 10]), num_intervals=4, interval_size=4,
                                       edge_fraction=0.1))
  assert _runs(m[0]) == [(0, 5), (8, 16), (18, 25), (36, 40)]
  # row 1: n = 31 -> edges of 4 at columns [10, 14) and [37, 40); centre 30 -> [28, 32); the other three centres
  # are the first non-edge real columns in index order (ties), [12,16) [13,17) [14,18) -> merged into [10, 18)
  assert _runs(m[1]) == [(10, 18), (28, 32), (37, 40)]
  assert not m[1, :10].any()
  # edges only / windows only
  only_edges = np.asarray(recompute.chosen_mask(jnp.asarray(imp), jnp.array([0, 10]), num_intervals=0,
                                                interval_size=4, edge_fraction=0.1))
  assert _runs(only_edges[0]) == [(0, 5), (36, 40)]
  only_win = np.asarray(recompute.chosen_mask(jnp.asarray(imp), jnp.array([0, 10]), num_intervals=1,
                                              interval_size=5, edge_fraction=0.0))
  assert _runs(only_win[0]) == [(0, 5)]  # centre 2 (no edges now) with 5 tokens: [0, 5)


def test_budget_bucketing_and_gather():
  assert recompute.budget(41, 4, 4, 0.1) == 32  # 2 * 5 + 16 = 26 -> 32
  assert recompute.budget(41, 4, 4, 0.1, multiple=8) == 32
  assert recompute.budget(41, 1, 4, 0.1, multiple=8) == 16  # 14 -> 16
  assert recompute.budget(20, 3, 8, 0.1) == 19  # capped at the T - 1 aux columns
  assert recompute.budget(41, 0, 8, 0.0) == 0
  chosen = jnp.array([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 1]], bool)
  cols, valid = recompute.gather_chosen(chosen, 4)
  np.testing.assert_array_equal(np.asarray(cols)[valid], [1, 2, 4, 0, 5])
  np.testing.assert_array_equal(np.asarray(valid).sum(1), [3, 2])


def test_zero_budget_is_plain_kvp_exactly(setup):
  cfg, base, kcfg, kp, tokens, starts = setup
  ref, ref_c = inference.kvp_prefill(kcfg, base, kp, tokens, starts, MAX_LEN)
  out, c = recompute.recompute_prefill(kcfg, base, kp, tokens, starts, MAX_LEN, num_intervals=3, interval_size=0,
                                       edge_fraction=0.0)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(c.k), np.asarray(ref_c.k))
  np.testing.assert_array_equal(np.asarray(c.v), np.asarray(ref_c.v))
  assert recompute.recompute_flops(kcfg, T, num_intervals=3, interval_size=0, edge_fraction=0.0) == (
      kvp_flops(cfg, kcfg.aux, T, in_width=kcfg.in_width, kind=kcfg.kind))


def test_full_budget_is_base_cache_and_generation(setup):
  cfg, base, kcfg, kp, tokens, starts = setup
  ref, ref_c = generation.prefill_jit(cfg, base, tokens, starts, max_len=MAX_LEN)
  out, c = recompute.recompute_prefill(kcfg, base, kp, tokens, starts, MAX_LEN, num_intervals=0, interval_size=0,
                                       edge_fraction=0.5)
  kvp_out, _ = inference.kvp_prefill(kcfg, base, kp, tokens, starts, MAX_LEN)
  assert float(jnp.max(jnp.abs(kvp_out - ref))) > 0.1  # the predicted cache alone is visibly wrong
  np.testing.assert_allclose(out, ref, atol=1e-4)
  valid = np.asarray((ref_c.slot_positions() >= 0) & (jnp.arange(MAX_LEN)[None] < T))[None, :, None, :, None]
  np.testing.assert_allclose(np.where(valid, c.k, 0), np.where(valid, ref_c.k, 0), atol=1e-4)
  np.testing.assert_allclose(np.where(valid, c.v, 0), np.where(valid, ref_c.v, 0), atol=1e-4)
  full = recompute.recompute_method(kcfg, base, kp, "lp1.0", 0, 0, edge_fraction=0.5)
  np.testing.assert_array_equal(ttft.greedy(full, tokens, starts, 8),
                                ttft.greedy(ttft.model_method("base", cfg, base), tokens, starts, 8))


def test_partial_budget_rewrites_only_chosen_slots(setup):
  # Layer-0 K/V depend only on token and position: recomputed slots get exactly the base's own, the rest keep
  # the predicted ones. A write to the wrong slot, or into padding, fails this.
  cfg, base, kcfg, kp, tokens, starts = setup
  kw = dict(num_intervals=2, interval_size=3, edge_fraction=0.1, importance="last_row")
  _, c = recompute.recompute_prefill(kcfg, base, kp, tokens, starts, MAX_LEN, **kw)
  pred = inference.predict_cache(kcfg, base, kp, tokens[:, :-1], starts, MAX_LEN)
  _, true = generation.prefill_jit(cfg, base, tokens, starts, max_len=MAX_LEN)
  pos = inference.positions(tokens[:, :-1], starts)
  aux_out = decoder.forward_layers(kcfg.aux, kp.aux, tokens[:, :-1], pos, compute_logits=False, collect_qk=True)
  chosen = np.asarray(recompute.chosen_mask(recompute.token_importance(aux_out.qk, pos, "last_row"), starts,
                                            num_intervals=2, interval_size=3, edge_fraction=0.1))
  assert 0 < chosen.sum(1).max() <= recompute.budget(T, 2, 3, 0.1) and not chosen[1, :5].any()
  chosen_S = np.zeros((2, MAX_LEN), bool)
  chosen_S[:, :T - 1] = chosen
  sel = chosen_S[:, None, :, None]
  k0, pk0, tk0 = np.asarray(c.k[0]), np.asarray(pred.k[0]), np.asarray(true.k[0])
  np.testing.assert_allclose(np.where(sel, k0, 0), np.where(sel, tk0, 0), atol=1e-5)
  rest = ~sel & (np.arange(MAX_LEN) < T - 1)[None, None, :, None]
  np.testing.assert_allclose(np.where(rest, k0, 0), np.where(rest, pk0, 0), atol=1e-5)  # pred: computed eagerly
  assert float(np.abs(np.where(sel, pk0 - tk0, 0)).max()) > 0.1  # so the two checks above can tell them apart
  # deeper layers of recomputed slots differ from both: they saw predicted context
  assert float(np.abs(np.where(sel, np.asarray(c.v[2]) - np.asarray(pred.v[2]), 0)).max()) > 1e-3


def test_flops_grow_with_budget(setup):
  _, _, kcfg, _, _, _ = setup
  f = [recompute.recompute_flops(kcfg, 512, num_intervals=i, interval_size=32, importance="last_row")
       for i in (0, 2, 8)]
  assert f[0] < f[1] < f[2] < recompute.recompute_flops(kcfg, 512, num_intervals=0, interval_size=0,
                                                        edge_fraction=0.5)
  # kvfun's column importance reads the aux's full attention maps, the last row only one query's
  assert recompute.recompute_flops(kcfg, 512, num_intervals=2, interval_size=32, importance="column") > f[1]
