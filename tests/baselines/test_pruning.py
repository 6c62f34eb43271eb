"""Token-pruning baselines: LazyLLM (keep 1.0 = base, no K/V computed twice under revival, padding), random and
static pruning (keep 1.0 = base, padding), and the schedule / fraction rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvp_jax.baselines import pruning
from kvp_jax.models import generation
from kvp_jax.models import params as P
from kvp_jax.models.config import tiny_config
from kvp_jax.ttft import method as ttft

T, MAX_LEN = 20, 28
SCHEDULE = ((1, 0.5), (2, 0.5))


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config(num_layers=3)
  base = P.init(cfg, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, T), 3, cfg.vocab_size)
  starts = jnp.array([0, 6], jnp.int32)
  return cfg, base, tokens, starts


@pytest.fixture(scope="module")
def base_ref(setup):
  cfg, base, tokens, starts = setup
  logits, _ = generation.prefill_jit(cfg, base, tokens, starts, max_len=MAX_LEN)
  return logits, ttft.greedy(ttft.model_method("base", cfg, base), tokens, starts, MAX_LEN - T)


def test_fraction_and_schedule_rules():
  assert pruning.ceil_fraction(10, 0.7) == 7 and pruning.ceil_fraction(10, 0.71) == 8
  assert pruning.ceil_fraction(1, 0.1) == 1 and pruning.ceil_fraction(0, 0.5) == 0
  np.testing.assert_array_equal(pruning.ceil_fraction(jnp.array([3, 10, 11]), 0.5), [2, 5, 6])
  assert pruning.parse_schedule("4:0.7, 8:0.5") == ((4, 0.7), (8, 0.5))
  for bad in [((0, 0.5),), ((2, 0.5), (1, 0.5)), ((1, 0.0),), ((3, 0.5),)]:
    with pytest.raises(ValueError):
      pruning.check_schedule(bad, 3)
  assert pruning.stage_counts(3, 20, SCHEDULE) == [(0, 1, 20), (1, 2, 10), (2, 3, 5)]
  cfg = tiny_config(num_layers=3)
  f = [pruning.lazyllm_flops(cfg, 256, s) for s in [((1, 1.0),), ((1, 0.5),), SCHEDULE]]
  assert f[0] > f[1] > f[2]
  assert pruning.random_prune_flops(cfg, 256, 1.0) == pruning.flops.prefill_flops(cfg, 256)
  assert pruning.static_prune_flops(cfg, 256, 0.5) > pruning.random_prune_flops(cfg, 256, 0.5)


def test_lazyllm_keep_one_is_base(setup, base_ref):
  cfg, base, tokens, starts = setup
  ref_logits, ref_gen = base_ref
  m = pruning.lazyllm_method(cfg, base, ((1, 1.0), (2, 1.0)), max_revive=2)
  logits, state = m.prefill(tokens, starts, MAX_LEN)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-6)
  assert int(jnp.min(jnp.where(state.cache.slot_positions() >= 0, state.depth(), 3)[:, :T])) == 3
  np.testing.assert_array_equal(ttft.greedy(m, tokens, starts, MAX_LEN - T), ref_gen)


def test_lazyllm_never_computes_a_kv_twice_and_revives(setup):
  cfg, base, tokens, starts = setup
  L = cfg.num_layers
  logits, state = pruning.lazyllm_prefill(cfg, base, tokens, starts, MAX_LEN, schedule=SCHEDULE)
  after_prefill = np.asarray(state.kv_count)
  real = np.asarray(state.cache.slot_positions() >= 0)[:, :T]
  # prefill: all real tokens at layer 0, ceil(n/2) at layer 1, ceil(ceil(n/2)/2) at layer 2; padding never
  n = np.array([T, T - 6])
  np.testing.assert_array_equal(after_prefill[:, :, :T].sum(-1), [n, -(-n // 2), -(-(-(-n // 2)) // 2)])
  assert not after_prefill[:, :, :T][:, ~real].any()
  assert after_prefill[:, :, T - 1].min() == 1  # the last token always runs every layer
  for step in range(6):
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
    logits, state = pruning.lazyllm_step(cfg, base, nxt, state, schedule=SCHEDULE, max_revive=3)
    count = np.asarray(state.kv_count)
    assert count.max() == 1, f"a (layer, token) K/V was computed twice at step {step}"
    computed = count > 0
    assert (computed[1:] <= computed[:-1]).all()  # layers computed form a prefix: state came from the Aux Cache
    assert computed[:, :, T + step].all()  # the new token runs every layer
    assert np.isfinite(np.asarray(logits)).all()
  revived = (np.asarray(state.kv_count)[:, :, :T] > after_prefill[:, :, :T]).sum()
  assert revived > 0, "no pruned token was ever revived: the test would not exercise the Aux Cache"
  assert revived <= 6 * 3 * 2 * (L - 1)  # at most max_revive revivals per row and step, each for <= L-1 layers


def test_lazyllm_padding_does_not_change_a_prompt(setup):
  cfg, base, tokens, _ = setup
  # the 14-token prompt tokens[0, 6:] left-padded by 6, twice, with different pad ids
  solo = jnp.concatenate([jnp.zeros(6, jnp.int32), tokens[0, 6:]])
  batch = jnp.stack([solo, jnp.where(jnp.arange(T) < 6, 7, solo)])
  starts = jnp.array([6, 6], jnp.int32)
  logits, _ = pruning.lazyllm_prefill(cfg, base, batch, starts, MAX_LEN, schedule=SCHEDULE)
  np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)
  # next to a full-length prompt it gives the same answer, which differs from that prompt's
  rows = jnp.stack([tokens[0], solo])
  full, _ = pruning.lazyllm_prefill(cfg, base, rows, jnp.array([0, 6], jnp.int32), MAX_LEN, schedule=SCHEDULE)
  np.testing.assert_allclose(full[1], logits[0], atol=1e-5)
  assert float(jnp.max(jnp.abs(full[0] - full[1]))) > 1e-3


@pytest.mark.parametrize("name", ["random", "static"])
def test_prune_keep_one_is_base(setup, base_ref, name):
  cfg, base, tokens, starts = setup
  ref_logits, ref_gen = base_ref
  m = (pruning.random_prune_method(cfg, base, 1.0, seed=3) if name == "random"
       else pruning.static_prune_method(cfg, base, 1.0))
  logits, _ = m.prefill(tokens, starts, MAX_LEN)
  np.testing.assert_allclose(logits, ref_logits, atol=1e-6)
  np.testing.assert_array_equal(ttft.greedy(m, tokens, starts, MAX_LEN - T), ref_gen)


@pytest.mark.parametrize("name", ["random", "static"])
def test_prune_padded_batch(setup, base_ref, name):
  # Row 1 = row 0's last 14 tokens with 6 pads: as a separate prompt it must match the same prompt padded with
  # other pad ids, keep half its tokens, and differ from the base (something was pruned).
  cfg, base, tokens, _ = setup
  solo = jnp.concatenate([jnp.zeros(6, jnp.int32), tokens[0, 6:]])
  batch = jnp.stack([solo, jnp.where(jnp.arange(T) < 6, 9, solo)])
  starts = jnp.array([6, 6], jnp.int32)
  fn = pruning.random_prune_prefill if name == "random" else pruning.static_prune_prefill
  kw = {"seed": 1} if name == "random" else {}
  logits, (cache, pos) = fn(cfg, base, batch, starts, MAX_LEN, keep=0.5, **kw)
  np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)
  np.testing.assert_array_equal(cache.lengths(), [7, 7])  # ceil(14 / 2) kept per row
  np.testing.assert_array_equal(pos, [14, 14])  # decoding continues at the true position
  ref, _ = generation.prefill_jit(cfg, base, batch, starts, max_len=MAX_LEN)
  assert float(jnp.max(jnp.abs(logits - ref))) > 1e-3
  logits2, _ = pruning.positioned_step(cfg, base, jnp.argmax(logits, -1)[:, None].astype(jnp.int32), (cache, pos))
  np.testing.assert_allclose(logits2[0], logits2[1], atol=1e-5)
