"""KV Prediction's joint training loss (METHOD.md, "Training"); plain language modelling is in
kvp_jax/models/lm_loss.py.

kvp loss = w_base * CE(base logits computed with predicted KV) + w_aux * CE(aux logits)
         + lambda_c * reduce_over_layers(L1(K_pred, K_base) + L1(V_pred, V_base))
         + z_loss * mean(logsumexp^2)  [on every CE term]
         + qk_weight * mean_layers |Q_base K_pred^T - Q_base K_base^T| (RoPE applied, causal, 1/sqrt(H) scale).
K is compared pre-RoPE and pre-key-norm, where the predictor writes. The base is a non-differentiated input:
gradients flow *through* it to the predicted KV, never into its parameters.
Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvp_jax.kvp import predictor
from kvp_jax.kvp.predictor import KVPConfig
from kvp_jax.models import attention
from kvp_jax.models import cache as kv_cache
from kvp_jax.models import decoder
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.lm_loss import cross_entropy
from kvp_jax.models.params import Params

KV_REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class KVPLossConfig:
  w_base: float = 1.0
  w_aux: float = 1.0
  lambda_c: float = 1.0  # scale of the consistency term; its reduction over layers is `kv_reduce`
  kv_reduce: str = "mean"  # "mean": lambda_C = 1/n_B (the paper's better choice); "sum": CoreNet's configs
  z_loss: float = 1e-4
  qk_weight: float = 0.0
  attention_mode: str = "corenet"  # or "aligned"

  def __post_init__(self):
    if self.kv_reduce not in KV_REDUCTIONS:
      raise ValueError(f"kv_reduce must be one of {KV_REDUCTIONS}, got {self.kv_reduce!r}")
    if self.attention_mode not in ("corenet", "aligned"):
      raise ValueError(f"attention_mode must be 'corenet' or 'aligned', got {self.attention_mode!r}")


def qk_loss(cfg: ModelConfig, base: Params, base_inputs, kv_pred, kv_true, positions_BT):
  """Mean over layers of |Q K_pred^T - Q K_true^T| on causal entries, Q and K rotated, scaled by 1/sqrt(H)."""
  mask = attention.causal_mask(positions_BT, positions_BT)[:, None, None]  # [B, 1, 1, T, S]
  terms = []
  for lp, h, pred, true in zip(base.layers, base_inputs, kv_pred, kv_true):
    q, _, _ = decoder.project_qkv(cfg, lp, h)
    q = decoder.rotate_queries(cfg, lp, q, positions_BT)
    kp = jnp.swapaxes(kv_cache.keys_to_cache(cfg, lp.k_norm, pred.k, positions_BT), 1, 2)
    kt = jnp.swapaxes(kv_cache.keys_to_cache(cfg, lp.k_norm, true.k, positions_BT), 1, 2)
    diff = jnp.abs(attention.scores(q, kp) - attention.scores(q, kt))
    terms.append(jnp.sum(jnp.where(mask, diff, 0.0)) / (jnp.sum(mask) * diff.shape[1] * diff.shape[2]))
  return jnp.mean(jnp.stack(terms))


def kvp_loss(kcfg: KVPConfig, lcfg: KVPLossConfig, trainable, frozen, base: Params, batch, remat: str = "none"):
  """trainable/frozen: dicts that together hold 'aux' and 'pred' (the aux is frozen with --freeze_aux).

  remat: per-layer rematerialisation of the two passes gradients flow through (aux, base on predicted KV);
  batch["loss_denominator"], if present, replaces the token count of the CE means (gradient accumulation).
  """
  p = {**frozen, **trainable}
  tokens, targets = batch["inputs"], batch["targets"]
  pos = decoder.default_positions(tokens)
  need_aux_logits = lcfg.w_aux > 0
  aux_out = decoder.forward_layers(kcfg.aux, p["aux"], tokens, pos, compute_logits=need_aux_logits,
                                   remat=remat, **predictor.collect_flags(kcfg.kind))
  kv_pred = predictor.predict(kcfg, p["pred"], aux_out)
  # The teacher: the base's own K/V (and normalised inputs for the QK term), with no gradient anywhere.
  teacher = decoder.forward_layers(kcfg.base, base, tokens, pos, collect_kv=True,
                                   collect_inputs=lcfg.qk_weight > 0, compute_logits=False)
  teacher = jax.lax.stop_gradient(teacher)
  base_out = decoder.forward_layers(kcfg.base, base, tokens, pos, kv_override=kv_pred,
                                    attention_mode=lcfg.attention_mode, remat=remat)
  weights = batch.get("weights")
  denom = batch.get("loss_denominator")
  base_total, ce_base = cross_entropy(base_out.logits, targets, lcfg.z_loss, weights, denom)
  aux_total, ce_aux = (cross_entropy(aux_out.logits, targets, lcfg.z_loss, weights, denom) if need_aux_logits
                       else (jnp.zeros(()), jnp.zeros(())))
  per_layer = jnp.stack([jnp.mean(jnp.abs(pr.k - tr.k)) + jnp.mean(jnp.abs(pr.v - tr.v))
                         for pr, tr in zip(kv_pred, teacher.kv)])
  kv = jnp.mean(per_layer) if lcfg.kv_reduce == "mean" else jnp.sum(per_layer)
  loss = lcfg.w_base * base_total + lcfg.w_aux * aux_total + lcfg.lambda_c * kv
  metrics = {"loss_base": ce_base, "loss_aux": ce_aux, "loss_kv": kv}
  if lcfg.qk_weight > 0:
    qk = qk_loss(kcfg.base, base, teacher.inputs, kv_pred, teacher.kv, pos)
    loss = loss + lcfg.qk_weight * qk
    metrics["loss_qk"] = qk
  metrics["loss"] = loss
  return loss, metrics
