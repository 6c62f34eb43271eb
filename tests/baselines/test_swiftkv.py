"""SwiftKV: nothing skipped is the base; with SwiftKV layers, prefill and every decode step equal the training
forward (all positions) at their positions, padded or not; the initialisation is the base's own weights; the
distillation loss is theirs; FLOPs are XLA's; training resumes and the loss falls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params
from kvp_jax.baselines import swiftkv
from kvp_jax.models import decoder
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig, tiny_config
from kvp_jax.ttft import method as ttft

T, MAX_LEN, START = 20, 28, 6
CFG = tiny_config(num_layers=4)


@jax.jit
def _forward(base, skv, row):
  """SwiftKV's training forward: every position, no cache."""
  pos = decoder.default_positions(row)
  h_k = swiftkv.teacher_forward(CFG, base, swiftkv.cutoff(CFG, skv), row, pos)[1]
  return swiftkv.student_forward(CFG, base, skv, h_k, pos)[0]


@pytest.fixture(scope="module")
def setup():
  cfg = CFG
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, T + 4), 3, cfg.vocab_size)
  return cfg, random_params(cfg, 0), tokens, jnp.array([0, START], jnp.int32)


def test_nothing_skipped_is_base(setup):
  cfg, base, tokens, starts = setup
  skv = swiftkv.init_from_base(cfg, base, cfg.num_layers)
  ref, _ = decoder.prefill(cfg, base, tokens[:, :T], starts, MAX_LEN)
  m = swiftkv.swiftkv_method(cfg, base, skv)
  logits, _ = m.prefill(tokens[:, :T], starts, MAX_LEN)
  np.testing.assert_allclose(logits, ref, atol=2e-5)
  np.testing.assert_array_equal(ttft.greedy(m, tokens[:, :T], starts, 8),
                                ttft.greedy(ttft.model_method("base", cfg, base), tokens[:, :T], starts, 8))


def test_init_is_the_base_weights(setup):
  cfg, base, _, _ = setup
  skv = swiftkv.init_from_base(cfg, base, 1)
  np.testing.assert_array_equal(skv.norm, base.layers[1].attn_norm)
  for j, lp in enumerate(base.layers[1:]):
    np.testing.assert_array_equal(skv.wq[j], lp.wq)
    np.testing.assert_array_equal(skv.wkv[:, j, 0], lp.wk)
    np.testing.assert_array_equal(skv.wkv[:, j, 1], lp.wv)


@pytest.mark.parametrize("k", [1, 2])
def test_prefill_and_decode_equal_the_training_forward(setup, k):
  cfg, base, tokens, starts = setup
  skv = swiftkv.init_from_base(cfg, base, k)
  skv = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.PRNGKey(5), a.shape), skv)
  ref, _ = decoder.prefill(cfg, base, tokens[:, :T], starts, MAX_LEN)
  logits, cache = swiftkv.swiftkv_prefill(cfg, base, skv, tokens[:, :T], starts, MAX_LEN)
  assert float(jnp.max(jnp.abs(logits - ref))) > 1e-2  # layers >= k read other K/V than the base's
  steps = [logits]
  for i in range(4):
    logits, cache = swiftkv.swiftkv_step(cfg, base, skv, tokens[:, T + i:T + i + 1], cache)
    steps.append(logits)
  for b in range(2):
    full = _forward(base, skv, tokens[b:b + 1, int(starts[b]):])[0]  # every position, no cache
    n = T - int(starts[b])
    for i, s in enumerate(steps):
      np.testing.assert_allclose(s[b], full[n - 1 + i], atol=2e-5)


def test_logits_loss_is_theirs():
  """ArcticTraining's SwiftKVTrainer.compute_logits_loss, in torch."""
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F
  r = np.random.default_rng(0)
  s, t = r.normal(size=(2, 5, 11)).astype(np.float32), r.normal(size=(2, 5, 11)).astype(np.float32)
  mask = (r.random((2, 5)) > 0.3).astype(np.float32)
  soft_targets = F.softmax(torch.from_numpy(t) / 2.0, dim=-1)
  soft_prob = F.log_softmax(torch.from_numpy(s) / 2.0, dim=-1)
  ref = torch.mean(torch.sum(soft_targets * (soft_targets.log() - soft_prob), dim=-1) * torch.from_numpy(mask)
                   * 2.0 ** 2)
  assert float(swiftkv.distill_logits_loss(s, t, mask, 2.0)) == pytest.approx(float(ref), rel=1e-5)


def test_flops_match_xla_cost_analysis():
  cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=64)
  base = P.init(cfg, jax.random.PRNGKey(0))
  tokens, starts = jnp.zeros((1, 256), jnp.int32), jnp.zeros((1,), jnp.int32)
  c = swiftkv.swiftkv_prefill.lower(cfg, base, swiftkv.init_from_base(cfg, base, 2), tokens, starts,
                                    max_len=256).compile()
  ca = c.cost_analysis()
  assert float((ca[0] if isinstance(ca, list) else ca)["flops"]) == pytest.approx(
      swiftkv.swiftkv_flops(cfg, 2, 256), rel=0.1)
  assert swiftkv.swiftkv_flops(cfg, 4, 256) == swiftkv.flops.prefill_flops(cfg, 256)
