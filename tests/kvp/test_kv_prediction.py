"""KV Prediction: layer maps, predictor invariants, the training objective and its stage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvp_jax.kvp import aux_models, inference, losses, predictor
from kvp_jax.models import decoder, generation
from kvp_jax.models import params as P
from kvp_jax.models.config import tiny_config
from kvp_jax.models.lm_loss import lm_loss


def test_kvp_c_layer_map_matches_paper_example():
  # METHOD.md: 28 base <- 16 aux: aux 0..11 twice each, then 12..15 once.
  m = aux_models.c_layer_map(28, 16)
  assert m == tuple(j for j in range(12) for _ in range(2)) + (12, 13, 14, 15)
  assert aux_models.c_layer_map(8, 3) == (0, 0, 0, 1, 1, 1, 2, 2)  # larger groups first
  assert aux_models.c_layer_map(4, 4) == (0, 1, 2, 3)


def test_kvp_lp_keep_rules_and_map():
  assert aux_models.lp_keep_layers(8, 0.25) == (0, 4)
  assert aux_models.lp_keep_layers(8, 0.5) == (0, 2, 4, 6)
  assert aux_models.lp_keep_layers(8, 0.75) == (0, 1, 2, 4, 5, 6)
  # base layer i uses the aux copy of the largest kept base layer <= i
  assert aux_models.lp_layer_map(8, (0, 1, 2, 4, 5, 6)) == (0, 1, 2, 2, 3, 4, 5, 5)
  assert aux_models.lp_layer_map(8, (0, 4)) == (0, 0, 0, 0, 1, 1, 1, 1)
  with pytest.raises(ValueError, match="keep fraction"):
    aux_models.lp_keep_layers(8, 0.6)
  with pytest.raises(ValueError, match="layer 0"):
    aux_models.lp_layer_map(8, (2, 4))


class _Tok:
  def __init__(self, n, shift=0):
    self.vocab = {f"t{i}": i + shift for i in range(n)}

  def get_vocab(self):
    return self.vocab

  def __len__(self):
    return len(self.vocab)


def test_vocab_mismatch_is_a_clear_error():
  base, aux = tiny_config(vocab_size=320), tiny_config(vocab_size=300)
  with pytest.raises(ValueError, match="vocab mismatch"):
    aux_models.check_compatible(base, aux)  # tables of other lengths, no tokenizers to show they agree
  with pytest.raises(ValueError, match="tokenizer mismatch"):
    aux_models.check_compatible(base, base, _Tok(290), _Tok(290, shift=1))
  with pytest.raises(ValueError, match="vocab mismatch"):
    aux_models.check_compatible(base, aux, _Tok(310), _Tok(310))  # the tokenizer overflows the aux's table


def test_padded_embedding_tables_pass_with_one_tokenizer():
  # Qwen2.5-0.5B (151936 rows) as the aux of Qwen2.5-7B (152064 rows): one 151665-token tokenizer fits both.
  aux_models.check_compatible(tiny_config(vocab_size=320), tiny_config(vocab_size=300), _Tok(290), _Tok(290))


def test_unknown_predictor_kind():
  cfg = tiny_config()
  with pytest.raises(ValueError, match="unknown predictor kind"):
    predictor.KVPConfig(cfg, cfg, "mlp", (0, 1))


def _identity_kvp(cfg, base):
  keep = tuple(range(cfg.num_layers))
  aux_cfg, aux = aux_models.prune_layers(cfg, base, keep)
  kcfg = predictor.KVPConfig(cfg, aux_cfg, "kv", aux_models.lp_layer_map(cfg.num_layers, keep))
  return kcfg, inference.KVPParams(aux, predictor.init(kcfg, jax.random.PRNGKey(1), how="identity"))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_identity_predictor_reproduces_base_cache_and_generation(qk_norm):
  cfg = tiny_config(num_layers=3, qk_norm=qk_norm, attention_bias=qk_norm)
  base = P.init(cfg, jax.random.PRNGKey(0))
  kcfg, kp = _identity_kvp(cfg, base)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 24), 3, cfg.vocab_size)
  starts = jnp.array([0, 7])
  pred, true = inference.predicted_and_true_cache(kcfg, base, kp, tokens, starts, 40)
  err = inference.layer_errors(pred, true)
  assert float(jnp.max(err["k"])) < 1e-6 and float(jnp.max(err["v"])) < 1e-6
  # and generation from the predicted cache is the base's own, token for token
  prompts = [list(np.asarray(tokens[0])), list(np.asarray(tokens[1, 7:]))]
  ours = inference.generate(kcfg, base, kp, prompts, 12)
  ref = generation.generate(cfg, base, prompts, 12)
  assert ours == ref


def test_untrained_predictor_differs_from_base():
  # The invariant above must be able to fail: a random predictor gives a visibly different cache.
  cfg = tiny_config(num_layers=2)
  base = P.init(cfg, jax.random.PRNGKey(0))
  kcfg, kp = _identity_kvp(cfg, base)
  kp = kp.replace(pred=predictor.init(kcfg, jax.random.PRNGKey(3), how="random"))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (1, 16), 3, cfg.vocab_size)
  pred, true = inference.predicted_and_true_cache(kcfg, base, kp, tokens, jnp.zeros(1, jnp.int32), 16)
  assert float(jnp.min(inference.layer_errors(pred, true)["v"])) > 0.1


def test_kvp_prefill_first_token_uses_base_own_kv_for_last_token():
  # With an identity predictor the first-token logits equal the base's own prefill logits.
  cfg = tiny_config(num_layers=2)
  base = P.init(cfg, jax.random.PRNGKey(0))
  kcfg, kp = _identity_kvp(cfg, base)
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 20), 3, cfg.vocab_size)
  starts = jnp.array([3, 0])
  ours, _ = inference.kvp_prefill(kcfg, base, kp, tokens, starts, 32)
  ref, _ = decoder.prefill(cfg, base, tokens, starts, 32)
  np.testing.assert_allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["kv", "activation"])
def test_predictor_handles_different_head_shapes(kind):
  base_cfg = tiny_config(num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16)
  aux_cfg = tiny_config(num_layers=2, hidden_size=32, num_heads=2, num_kv_heads=1, head_dim=24)
  kcfg = predictor.KVPConfig(base_cfg, aux_cfg, kind, aux_models.c_layer_map(4, 2))
  aux = P.init(aux_cfg, jax.random.PRNGKey(0))
  pp = predictor.init(kcfg, jax.random.PRNGKey(1))
  tokens = jnp.ones((2, 8), jnp.int32)
  out = decoder.forward_layers(aux_cfg, aux, tokens, compute_logits=False, **predictor.collect_flags(kind))
  kv = predictor.predict(kcfg, pp, out)
  assert len(kv) == 4 and kv[0].k.shape == (2, 8, 2, 16) and kv[0].v.shape == (2, 8, 2, 16)
  assert pp.wk.shape == (4, kcfg.in_width, 32)
  assert kcfg.in_width == (24 if kind == "kv" else 32)


def _loss_parts(kcfg, lcfg, trainable, base, batch):
  _, m = losses.kvp_loss(kcfg, lcfg, trainable, {}, base, batch)
  return {k: float(v) for k, v in m.items()}


@pytest.mark.parametrize("mode", ["corenet", "aligned"])
def test_identity_kvp_loss_has_zero_consistency_and_base_ce(mode):
  cfg = tiny_config(num_layers=2)
  base = P.init(cfg, jax.random.PRNGKey(0))
  kcfg, kp = _identity_kvp(cfg, base)
  toks = jax.random.randint(jax.random.PRNGKey(1), (2, 17), 3, cfg.vocab_size)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
  m = _loss_parts(kcfg, losses.KVPLossConfig(attention_mode=mode, qk_weight=1.0),
                  {"aux": kp.aux, "pred": kp.pred}, base, batch)
  base_ce = float(lm_loss(cfg, base, batch, 0.0)[1]["ce"])
  assert m["loss_kv"] < 1e-6 and m["loss_qk"] < 1e-5
  # corenet with identity KV is exactly the base's own causal attention; aligned too (own K/V at itself).
  assert abs(m["loss_base"] - base_ce) < 1e-4


def test_kv_reduce_mean_vs_sum():
  cfg = tiny_config(num_layers=3)
  base = P.init(cfg, jax.random.PRNGKey(0))
  kcfg, kp = _identity_kvp(cfg, base)
  kp = kp.replace(pred=predictor.init(kcfg, jax.random.PRNGKey(3), how="random"))
  toks = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 3, cfg.vocab_size)
  batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
  tr = {"aux": kp.aux, "pred": kp.pred}
  mean = _loss_parts(kcfg, losses.KVPLossConfig(kv_reduce="mean"), tr, base, batch)["loss_kv"]
  total = _loss_parts(kcfg, losses.KVPLossConfig(kv_reduce="sum"), tr, base, batch)["loss_kv"]
  assert total == pytest.approx(3 * mean, rel=1e-5)
