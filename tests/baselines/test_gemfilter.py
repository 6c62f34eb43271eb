"""GemFilter: keeping at least the prompt's length is the base, the selection is the released code's
(`standard_dis_index` in torch on the same queries and keys), the kept tokens become a fresh prompt with new
positions, padding changes nothing, FLOPs are XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params
from kvp_jax.baselines import gemfilter
from kvp_jax.models import decoder
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig, tiny_config
from kvp_jax.ttft import method as ttft

T, MAX_LEN, START = 40, 48, 10
_logits = jax.jit(decoder.logits, static_argnums=0)


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config(num_layers=4)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, T), 3, cfg.vocab_size)
  return cfg, random_params(cfg, 0), tokens, jnp.array([0, START], jnp.int32)


def test_topk_at_least_prompt_length_is_base(setup):
  cfg, base, tokens, starts = setup
  ref, _ = decoder.prefill(cfg, base, tokens, starts, MAX_LEN)
  m = gemfilter.gemfilter_method(cfg, base, topk=T)
  logits, _ = m.prefill(tokens, starts, MAX_LEN)
  np.testing.assert_allclose(logits, ref, atol=2e-5)
  np.testing.assert_array_equal(ttft.greedy(m, tokens, starts, 8),
                                ttft.greedy(ttft.model_method("base", cfg, base), tokens, starts, 8))


def test_selection_is_the_released_code_and_a_fresh_prompt(setup):
  """Their standard_dis_index(key_states_repeat, query_last, k, pool=True, sum_over_heads=True) at layer r."""
  torch = pytest.importorskip("torch")
  import torch.nn.functional as F
  cfg, base, tokens, starts = setup
  layer, topk = 1, 16
  m = gemfilter.gemfilter_method(cfg, base, topk=topk, layer=layer)
  logits, cache = m.prefill(tokens, starts, MAX_LEN)
  nxt = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
  logits2, _ = m.step(nxt, cache)
  qk = jax.jit(decoder.forward_layers, static_argnums=0, static_argnames="collect_qk")
  for b in range(2):
    row = tokens[b:b + 1, int(starts[b]):]
    q, k = qk(cfg, base, row, collect_qk=True).qk[layer]  # [1, n, N, H] rotated, [1, K, n, H] rotated
    query = torch.from_numpy(np.array(q)).transpose(1, 2)[:, :, -1:, :]  # (b, heads, 1, dim)
    key = torch.repeat_interleave(torch.from_numpy(np.array(k)), cfg.num_heads // cfg.num_kv_heads, dim=1)
    ip = torch.matmul(query, key.transpose(-1, -2))[:, :, 0, :].sum(dim=1, keepdim=True)
    ip = F.avg_pool1d(ip, kernel_size=5, padding=2, stride=1)
    idx = torch.sort(torch.topk(ip, min(topk, row.shape[1]), dim=-1).indices[0, 0])[0].numpy()
    kept = row[:, idx]
    np.testing.assert_allclose(logits[b], _logits(cfg, base, kept)[0, -1], atol=2e-5)  # positions 0..15
    np.testing.assert_allclose(logits2[b], _logits(cfg, base, jnp.concatenate([kept, nxt[b:b + 1]], 1))[0, -1],
                               atol=2e-5)


def test_padding_changes_nothing(setup):
  cfg, base, tokens, _ = setup
  solo = jnp.concatenate([jnp.zeros(START, jnp.int32), tokens[0, START:]])
  batch = jnp.stack([solo, jnp.where(jnp.arange(T) < START, 9, solo)])
  kw = dict(topk=12, layer=2)
  logits, _ = gemfilter.gemfilter_prefill(cfg, base, batch, jnp.array([START, START]), MAX_LEN, **kw)
  np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)
  short, _ = gemfilter.gemfilter_prefill(cfg, base, tokens[:1, START:], jnp.zeros(1, jnp.int32), MAX_LEN - START, **kw)
  np.testing.assert_allclose(logits[0], short[0], atol=1e-5)


def test_default_layer_and_flops_match_xla_cost_analysis():
  assert [gemfilter.default_layer(n) for n in (32, 30, 4)] == [13, 12, 1]  # 13 of 32 is theirs for Llama-3.1-8B
  cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=64)
  base = P.init(cfg, jax.random.PRNGKey(0))
  tokens, starts = jnp.zeros((1, 256), jnp.int32), jnp.zeros((1,), jnp.int32)
  c = gemfilter.gemfilter_prefill.lower(cfg, base, tokens, starts, max_len=256, topk=64, layer=1).compile()
  ca = c.cost_analysis()
  xla = float((ca[0] if isinstance(ca, list) else ca)["flops"])
  assert xla == pytest.approx(gemfilter.gemfilter_flops(cfg, 256, 64, 1), rel=0.1)
