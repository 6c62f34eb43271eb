"""SpecPrefill: keep 1.0 is the base, the base sees the kept tokens at their original positions and decodes on
from the true prompt length, the draft's queries are its own forward pass's, the scoring and chunk choice are
the released code's (run in torch on the same queries and keys), padding changes nothing, FLOPs are XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_params
from kvp_jax.baselines import specprefill
from kvp_jax.models import decoder
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig, tiny_config
from kvp_jax.ttft import method as ttft

_logits = jax.jit(decoder.logits, static_argnums=0)
T, MAX_LEN = 136, 144
START = 40  # row 1's left padding: rows of 136 and 96 tokens, 5 and 3 chunks of 32


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config(num_layers=3)
  dcfg = tiny_config(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, T), 3, cfg.vocab_size)
  return cfg, random_params(cfg, 0), dcfg, random_params(dcfg, 1), tokens, jnp.array([0, START], jnp.int32)


def test_keep_one_is_base(setup):
  cfg, base, dcfg, draft, tokens, starts = setup
  ref, _ = decoder.prefill(cfg, base, tokens, starts, MAX_LEN)
  m = specprefill.specprefill_method(cfg, base, dcfg, draft, 1.0, "draft")
  logits, _ = m.prefill(tokens, starts, MAX_LEN)
  np.testing.assert_allclose(logits, ref, atol=2e-5)
  np.testing.assert_array_equal(ttft.greedy(m, tokens, starts, 8),
                                ttft.greedy(ttft.model_method("base", cfg, base), tokens, starts, 8))


@pytest.mark.parametrize("keep_last", [True, False])
def test_base_sees_kept_tokens_at_original_positions(setup, keep_last):
  cfg, base, dcfg, draft, tokens, starts = setup
  imp = specprefill.token_importance(dcfg, draft, tokens, starts)
  kept = np.asarray(specprefill.select_chunks(imp, starts, keep=0.25, keep_last=keep_last))
  m = specprefill.specprefill_method(cfg, base, dcfg, draft, 0.25, "draft", keep_last=keep_last)
  logits, state = m.prefill(tokens, starts, MAX_LEN)
  nxt = jnp.argmax(logits, -1).astype(jnp.int32)[:, None]
  logits2, _ = m.step(nxt, state)
  for b in range(2):
    n = T - int(starts[b])
    idx = np.nonzero(kept[b])[0]
    rel = idx - int(starts[b])
    # whole 32-token chunks from the row's first token: ceil(0.25 * 5 or 3 chunks) = 2 or 1, and the last one
    assert len(set(rel // 32)) == (2 - b) + keep_last
    assert all(((rel // 32) == c).sum() == min(32, n - 32 * c) for c in set(rel // 32))
    if keep_last:
      assert (n - 1) // 32 in set(rel // 32)
    pos = jnp.asarray(rel)[None]
    ref = _logits(cfg, base, tokens[b:b + 1, idx], pos)[0, -1]
    np.testing.assert_allclose(logits[b], ref, atol=2e-5)
    # the next token goes at position n (the true prompt length), not at the count of kept tokens
    ref2 = _logits(cfg, base, jnp.concatenate([tokens[b:b + 1, idx], nxt[b:b + 1]], 1),
                        jnp.concatenate([pos, jnp.full((1, 1), n)], 1))[0, -1]
    np.testing.assert_allclose(logits2[b], ref2, atol=2e-5)
  assert float(jnp.max(jnp.abs(logits - decoder.prefill(cfg, base, tokens, starts, MAX_LEN)[0]))) > 1e-3


def test_draft_queries_are_its_forward_pass(setup):
  _, _, dcfg, draft, tokens, starts = setup
  q, valid, keys = specprefill.draft_queries(dcfg, draft, tokens, starts, 8)
  assert q.shape == (8, dcfg.num_layers, 2, dcfg.num_heads, dcfg.head_dim) and bool(valid.all())
  for b in range(2):
    row = tokens[b:b + 1, int(starts[b]):]
    gen = ttft.greedy(ttft.model_method("draft", dcfg, draft), row, jnp.zeros(1, jnp.int32), 7)
    out = jax.jit(decoder.forward_layers, static_argnums=0, static_argnames="collect_qk")(
        dcfg, draft, jnp.concatenate([row, jnp.asarray(gen)], 1), collect_qk=True)
    n = row.shape[1]
    for l, (q_l, k_l) in enumerate(out.qk):
      np.testing.assert_allclose(q[:, l, b], q_l[0, n - 1:n + 7], atol=2e-5)
      np.testing.assert_allclose(keys[l, b][:, int(starts[b]):], k_l[0][:, :n], atol=2e-5)


def test_scores_and_chunks_match_the_released_code(setup):
  """Their _get_attention_scores, _token_importance_from_attn_scores and _get_kept_indices_from_token_importance
  (look_ahead_spec_worker.py), in torch, on the same queries and keys, one unpadded row at a time."""
  torch = pytest.importorskip("torch")
  _, _, dcfg, draft, tokens, starts = setup
  q, _, keys = specprefill.draft_queries(dcfg, draft, tokens, starts, 8)
  imp = specprefill.token_importance(dcfg, draft, tokens, starts)
  G = dcfg.num_heads // dcfg.num_kv_heads
  for keep in (0.3, 0.5):
    kept = np.asarray(specprefill.select_chunks(imp, starts, keep=keep, keep_last=False))
    for b in range(2):
      s0 = int(starts[b])
      attn = []
      for l in range(dcfg.num_layers):
        # np.array, not asarray: torch warns on the read-only views of JAX arrays
        query = torch.from_numpy(np.array(q[:, l, b])).transpose(0, 1)  # (heads, steps, dim)
        key = torch.repeat_interleave(torch.from_numpy(np.array(keys[l, b][:, s0:])), G, dim=0)  # heads, n, dim
        attn.append(torch.matmul(query, key.transpose(-1, -2)) / np.sqrt(query.shape[-1]))
      attn = torch.softmax(torch.stack(attn), dim=-1, dtype=torch.float32).flatten(0, 1)
      attn = torch.nn.functional.avg_pool1d(attn, kernel_size=13, padding=13 // 2, stride=1)
      ti = attn.max(0)[0].mean(0)
      np.testing.assert_allclose(np.asarray(imp[b, s0:]), ti.numpy(), rtol=1e-4, atol=1e-7)
      chunk_ti = torch.stack([c.mean() for c in torch.split(ti, 32, dim=-1)])
      _, ci = torch.topk(chunk_ti, k=int(np.ceil(len(chunk_ti) * keep)), dim=-1)
      idx = torch.split(torch.arange(len(ti)), 32, dim=-1)
      ref = torch.sort(torch.concat([idx[c.item()] for c in ci]))[0].numpy()
      np.testing.assert_array_equal(np.nonzero(kept[b])[0] - s0, ref)


def test_padding_changes_nothing(setup):
  cfg, base, dcfg, draft, tokens, _ = setup
  solo = jnp.concatenate([jnp.zeros(START, jnp.int32), tokens[0, START:]])
  batch = jnp.stack([solo, jnp.where(jnp.arange(T) < START, 9, solo)])
  logits, _ = specprefill.specprefill_prefill(cfg, base, dcfg, draft, batch, jnp.array([START, START]), MAX_LEN,
                                              keep=0.25)
  np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)
  short, _ = specprefill.specprefill_prefill(cfg, base, dcfg, draft, tokens[:1, START:], jnp.zeros(1, jnp.int32),
                                             MAX_LEN - START, keep=0.25)
  np.testing.assert_allclose(logits[0], short[0], atol=1e-5)


def test_flops_match_xla_cost_analysis():
  cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=64)
  dcfg = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=2,
                     num_kv_heads=2, head_dim=64)
  base, draft = P.init(cfg, jax.random.PRNGKey(0)), P.init(dcfg, jax.random.PRNGKey(1))
  tokens, starts = jnp.zeros((1, 256), jnp.int32), jnp.zeros((1,), jnp.int32)
  c = specprefill.specprefill_prefill.lower(cfg, base, dcfg, draft, tokens, starts, max_len=256, keep=0.25).compile()
  ca = c.cost_analysis()
  xla = float((ca[0] if isinstance(ca, list) else ca)["flops"])
  assert xla == pytest.approx(specprefill.specprefill_flops(cfg, dcfg, 256, 0.25), rel=0.1)
  assert specprefill.kept_tokens(100, 0.5) == 64 + 4 and specprefill.kept_tokens(100, 0.5, keep_last=False) == 64
  assert specprefill.kept_tokens(100, 0.75) == specprefill.kept_tokens(100, 1.0) == 100
