"""SwiftKV's SingleInputKV (Qiao et al., arXiv 2410.03960; snowflakedb/ArcticTraining projects/swiftkv for training,
snowflakedb/ArcticInference vllm/swiftkv for inference): prompt tokens skip every layer from a cutoff k on.

As their code does it
- Layers 0..k-1 are the base's. The residual stream entering layer k, normalised by a new RMSNorm (initialised
  from layer k's input norm), feeds new K and V projections of every layer j >= k (initialised from layer j's own
  k/v weights): one fused matmul writes all of them. Layers j >= k get new query projections (initialised from
  their own); o_proj, the MLPs, the other norms, embeddings and LM head stay the base's.
- Prefill: every prompt token runs layers < k and the fused projection; only the last prompt token runs layers
  k..L-1 (its queries attend to the SwiftKV K/V of the whole prompt). Decode does the same for each new token, so
  layers >= k always read SwiftKV K/V: training and inference agree.
- Training (`swiftkv_loss`): self-distillation from the unmodified base; only the new norm and q/k/v projections
  train. KL(teacher || student) of the logits at temperature T (2), times T^2, averaged over all B*T positions
  with masked ones counting zero (as theirs: torch.mean of the masked KL), plus MSE (weight 1) between the
  student's and the teacher's input of the last decoder layer (HF `hidden_states[-2]`), over every token.
  The mask is the batch's loss weights (padding and, with --qa_context_loss=false, QA contexts out); theirs
  keeps assistant turns, marked on input tokens (one position off the predictions they weigh).
- Keys take the base layer's key norm (Qwen3, which they do not ship) and RoPE at the token's position.
Not kept: AcrossKV (every shipped config leaves it off), their vLLM paging, gradient checkpointing.

The state is an ordinary KVCache of all L layers, so evaluation's teacher forcing and greedy loops use it as is.
Shape legend: see kvp_jax/models/config.py; here also J = L - k SwiftKV layers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from kvp_jax.models import attention, checkpoints, decoder, flops, hf_checkpoint
from kvp_jax.models import cache as kv_cache
from kvp_jax.models import params as P
from kvp_jax.models.cache import KVCache
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.layers import dense, rms_norm
from kvp_jax.models.params import Params
from kvp_jax.ttft import method as ttft


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SwiftKVParams:
  """What SwiftKV adds to the base (all of it trains; the base never does)."""
  norm: Any  # [D] RMSNorm of the residual stream entering layer k
  wq: Any  # [J, D, N, H] query projections of layers k..L-1
  wkv: Any  # [D, J, 2, K, H] K and V projections of layers k..L-1, fused: one matmul for all of them
  bq: Any = None  # [J, N, H] (attention_bias models)
  bkv: Any = None  # [J, 2, K, H]

  @property
  def num_layers(self) -> int:  # J
    return self.wq.shape[0]


def cutoff(cfg: ModelConfig, skv: SwiftKVParams) -> int:
  """k: the number of layers every prompt token runs."""
  return cfg.num_layers - skv.num_layers


def cutoff_layers(num_layers: int, fraction: float) -> int:
  """k = fraction * L rounded half up (their Llama configs: 0.5; Qwen2.5: 0.75)."""
  k = int(fraction * num_layers + 0.5)
  if not 0.0 < fraction <= 1.0 or not 1 <= k <= num_layers:
    raise ValueError(f"SwiftKV cutoff fraction {fraction} gives k={k} of {num_layers} layers; it must keep "
                     "between 1 and all layers")
  return k


def init_from_base(cfg: ModelConfig, base: Params, k: int) -> SwiftKVParams:
  """Their initialisation: the norm from layer k's input norm, each projection from the layer's own."""
  if not 1 <= k <= cfg.num_layers:
    raise ValueError(f"SwiftKV cutoff k={k} must be in [1, {cfg.num_layers}]")
  late = base.layers[k:]
  D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  if not late:  # k = L: nothing skipped, nothing added (the base itself)
    z = jnp.zeros((0,), base.embed.dtype)
    return SwiftKVParams(norm=jnp.array(base.final_norm), wq=z.reshape(0, D, N, H), wkv=z.reshape(D, 0, 2, K, H),
                         bq=z.reshape(0, N, H) if cfg.attention_bias else None,
                         bkv=z.reshape(0, 2, K, H) if cfg.attention_bias else None)
  return SwiftKVParams(
      norm=jnp.array(base.layers[k].attn_norm),
      wq=jnp.stack([lp.wq for lp in late]),
      wkv=jnp.stack([jnp.stack([lp.wk, lp.wv], axis=1) for lp in late], axis=1),
      bq=jnp.stack([lp.bq for lp in late]) if cfg.attention_bias else None,
      bkv=jnp.stack([jnp.stack([lp.bk, lp.bv]) for lp in late]) if cfg.attention_bias else None)


def logical_axes(skv: SwiftKVParams) -> SwiftKVParams:
  """Sharding axes (kvp_jax/training/sharding.py) of each SwiftKV parameter, like the base's projections."""
  return SwiftKVParams(norm=("embed",), wq=(None, "embed", "heads", "head_dim"),
                       wkv=("embed", None, None, "kv_heads", "head_dim"),
                       bq=None if skv.bq is None else (None, "heads", "head_dim"),
                       bkv=None if skv.bkv is None else (None, None, "kv_heads", "head_dim"))


def load_swiftkv(workdir, base_params=None, dtype=None) -> tuple[ModelConfig, Params, SwiftKVParams]:
  """(base cfg, base params, SwiftKVParams) from a workdir of `python -m kvp_jax.train --stage=swiftkv`; the base
  is loaded from the path the run recorded unless given."""
  dtype = dtype or jnp.float32
  p = Path(workdir)
  if not (p / checkpoints.SWIFTKV_CONFIG).exists():
    raise hf_checkpoint.CheckpointError(f"no {checkpoints.SWIFTKV_CONFIG} in {p}; pass a workdir made by "
                                        "--stage=swiftkv")
  meta = json.loads((p / checkpoints.SWIFTKV_CONFIG).read_text())
  cfg = ModelConfig.from_dict(meta["base"])
  if base_params is None:
    _, base_params = checkpoints.load_model(meta["base_checkpoint"], dtype)
  ck = checkpoints.Checkpointer(p, save_every=1)
  if ck.latest_step() is None:
    raise hf_checkpoint.CheckpointError(f"{p} has no finished checkpoint yet; train it first (or wait)")
  k = meta["cutoff_layers"]
  params = ck.restore_params(jax.eval_shape(lambda b: init_from_base(cfg, b, k), P.abstract(cfg)))
  ck.close()
  return cfg, base_params, P.cast(params, dtype)


# ---------------------------------------------------------------------------------------------- the model


def _base_layer(cfg: ModelConfig, lp, x_BTD, pos_BT):
  """One ordinary layer over T causal tokens without a cache: (x, cache-ready k, v)."""
  q, k, v = decoder.project_qkv(cfg, lp, rms_norm(x_BTD, lp.attn_norm, cfg.rms_norm_eps))
  q = decoder.rotate_queries(cfg, lp, q, pos_BT)
  k = kv_cache.keys_to_cache(cfg, lp.k_norm, k, pos_BT)
  o = attention.causal_self_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), pos_BT)
  return decoder.attn_out_and_mlp(cfg, lp, x_BTD, o), k, v


def swift_kv(cfg: ModelConfig, base: Params, skv: SwiftKVParams, h_BTD, pos_BT):
  """SwiftKV K/V of every layer >= k from the residual stream entering layer k: J x (cache-ready k, v),
  [B, T, K, H] each, from one fused projection."""
  k0 = cutoff(cfg, skv)
  if skv.num_layers == 0:
    return []
  kv = dense(rms_norm(h_BTD, skv.norm, cfg.rms_norm_eps), skv.wkv)  # [B, T, J, 2, K, H]
  if skv.bkv is not None:
    kv = kv + skv.bkv
  return [(kv_cache.keys_to_cache(cfg, base.layers[k0 + j].k_norm, kv[:, :, j, 0], pos_BT), kv[:, :, j, 1])
          for j in range(skv.num_layers)]


def _swift_query(cfg: ModelConfig, base: Params, skv: SwiftKVParams, j: int, x_BTD, pos_BT):
  lp = base.layers[cutoff(cfg, skv) + j]
  q = dense(rms_norm(x_BTD, lp.attn_norm, cfg.rms_norm_eps), skv.wq[j])
  if skv.bq is not None:
    q = q + skv.bq[j]
  return decoder.rotate_queries(cfg, lp, q, pos_BT)


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"))
def swiftkv_prefill(cfg: ModelConfig, base: Params, skv: SwiftKVParams, tokens_BT, starts_B, max_len: int):
  """Left-padded prompts [B, T] -> (logits [B, V] of the first new token, a KVCache of all L layers)."""
  B, T = tokens_BT.shape
  if T > max_len:
    raise ValueError(f"prompt of {T} tokens does not fit a cache of max_len={max_len}; raise max_len")
  k0 = cutoff(cfg, skv)
  starts = jnp.asarray(starts_B, jnp.int32)
  pos = jnp.arange(T, dtype=jnp.int32)[None, :] - starts[:, None]
  cache = kv_cache.empty(cfg, B, max_len, base.embed.dtype, starts)
  x = base.embed[tokens_BT]
  for i in range(k0):
    x, k, v = _base_layer(cfg, base.layers[i], x, pos)
    cache = kv_cache.write_layer(cache, i, k, v, 0)
  x_last, pos_last = x[:, -1:], pos[:, -1:]
  mask_B1T = attention.causal_mask(pos_last, pos)
  for j, (k, v) in enumerate(swift_kv(cfg, base, skv, x, pos)):
    cache = kv_cache.write_layer(cache, k0 + j, k, v, 0)
    q = _swift_query(cfg, base, skv, j, x_last, pos_last)
    o = attention.masked_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask_B1T)
    x_last = decoder.attn_out_and_mlp(cfg, base.layers[k0 + j], x_last, o)
  return decoder.lm_logits(cfg, base, x_last[:, 0]), cache.replace(end=jnp.asarray(T, jnp.int32))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def swiftkv_step(cfg: ModelConfig, base: Params, skv: SwiftKVParams, tokens_B1, cache: KVCache):
  """One decode step, the cache donated: layers < k as the base's, then SwiftKV K/V of the new token for every
  later layer and its SwiftKV queries there. (logits [B, V], cache)."""
  k0 = cutoff(cfg, skv)
  slot = cache.end
  pos = (slot - cache.starts)[:, None]
  mask_B1S = attention.causal_mask(pos, cache.slot_positions()) & (jnp.arange(cache.max_len)[None, None] <= slot)
  x = base.embed[tokens_B1]
  for i in range(k0):
    lp = base.layers[i]
    q, k, v = decoder.project_qkv(cfg, lp, rms_norm(x, lp.attn_norm, cfg.rms_norm_eps))
    q = decoder.rotate_queries(cfg, lp, q, pos)
    cache = kv_cache.write_layer(cache, i, kv_cache.keys_to_cache(cfg, lp.k_norm, k, pos), v, slot)
    x = decoder.attn_out_and_mlp(cfg, lp, x, attention.masked_attention(q, cache.k[i], cache.v[i], mask_B1S))
  for j, (k, v) in enumerate(swift_kv(cfg, base, skv, x, pos)):
    cache = kv_cache.write_layer(cache, k0 + j, k, v, slot)
  for j in range(skv.num_layers):
    q = _swift_query(cfg, base, skv, j, x, pos)
    o = attention.masked_attention(q, cache.k[k0 + j], cache.v[k0 + j], mask_B1S)
    x = decoder.attn_out_and_mlp(cfg, base.layers[k0 + j], x, o)
  return decoder.lm_logits(cfg, base, x[:, 0]), cache.replace(end=slot + 1)


# ---------------------------------------------------------------------------------------------- training


def teacher_forward(cfg: ModelConfig, base: Params, k0: int, tokens_BT, pos_BT):
  """The unmodified base: (logits [B, T, V], residual entering layer k, residual entering layer L-1)."""
  x = base.embed[tokens_BT]
  h_k = h_last = None
  for i, lp in enumerate(base.layers):
    if i == k0:
      h_k = x
    if i == cfg.num_layers - 1:
      h_last = x
    x, _, _ = _base_layer(cfg, lp, x, pos_BT)
  return decoder.lm_logits(cfg, base, x), h_k, h_last


def student_forward(cfg: ModelConfig, base: Params, skv: SwiftKVParams, h_k_BTD, pos_BT):
  """SwiftKV at every position from the residual stream entering layer k (layers < k are the base's, so the
  teacher's h_k serves): (logits [B, T, V], residual entering layer L-1)."""
  k0 = cutoff(cfg, skv)
  x, h_last = h_k_BTD, h_k_BTD
  for j, (k, v) in enumerate(swift_kv(cfg, base, skv, h_k_BTD, pos_BT)):
    if k0 + j == cfg.num_layers - 1:
      h_last = x
    q = _swift_query(cfg, base, skv, j, x, pos_BT)
    o = attention.causal_self_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), pos_BT)
    x = decoder.attn_out_and_mlp(cfg, base.layers[k0 + j], x, o)
  return decoder.lm_logits(cfg, base, x), h_last


@dataclasses.dataclass(frozen=True)
class SwiftKVLossConfig:
  temperature: float = 2.0  # theirs: logits_loss_temp
  hidden_weight: float = 1.0  # theirs: hidden_loss_mult, on hidden_states[-2]


def distill_logits_loss(student_BTV, teacher_BTV, weights_BT, temperature: float):
  """KL(teacher || student) of the logits softened by `temperature`, times temperature^2, averaged over all
  B*T positions with the masked ones (weights 0) counting zero: theirs `torch.mean(kl * mask) * T**2`."""
  log_pt = jax.nn.log_softmax(teacher_BTV.astype(jnp.float32) / temperature, axis=-1)
  log_ps = jax.nn.log_softmax(student_BTV.astype(jnp.float32) / temperature, axis=-1)
  kl_BT = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
  if weights_BT is not None:
    kl_BT = kl_BT * weights_BT
  return jnp.mean(kl_BT) * temperature ** 2


def swiftkv_loss(cfg: ModelConfig, lcfg: SwiftKVLossConfig, skv: SwiftKVParams, base: Params, batch):
  """Self-distillation of SwiftKV from the base (ArcticTraining's SwiftKVTrainer.loss): (loss, metrics)."""
  tokens = batch["inputs"]
  pos = decoder.default_positions(tokens)
  k0 = cutoff(cfg, skv)
  t_logits, h_k, t_last = jax.lax.stop_gradient(teacher_forward(cfg, base, k0, tokens, pos))
  s_logits, s_last = student_forward(cfg, base, skv, h_k, pos)
  weights = batch.get("weights")
  logits_loss = distill_logits_loss(s_logits, t_logits, weights, lcfg.temperature)
  hidden_loss = jnp.mean(jnp.square(s_last.astype(jnp.float32) - t_last.astype(jnp.float32)))
  loss = logits_loss + lcfg.hidden_weight * hidden_loss
  # Not optimised, for the log: the student's own next-token cross-entropy.
  lse = jax.nn.logsumexp(s_logits, axis=-1)
  ce_BT = lse - jnp.take_along_axis(s_logits, batch["targets"][..., None], axis=-1)[..., 0]
  w = jnp.ones_like(ce_BT) if weights is None else weights
  ce = jnp.sum(ce_BT * w) / jnp.maximum(jnp.sum(w), 1.0)
  return loss, {"loss": loss, "loss_logits": logits_loss, "loss_hidden": hidden_loss, "ce_student": ce}


# ---------------------------------------------------------------------------------------------- FLOPs, method


def swiftkv_flops(cfg: ModelConfig, k: int, prompt_len: int, *, attention: bool = True) -> int:
  """Layers < k over all n tokens (causal attention), the fused K/V projection of the J later layers over all
  n, the last token's q / o / MLP at those layers and its attention to n keys, the LM head once."""
  D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  n, J = prompt_len, cfg.num_layers - k
  f = k * flops.forward_flops(cfg.replace(num_layers=1), n, logits_positions=0, attention=attention)
  f += n * 2 * D * J * 2 * K * H
  f += J * 2 * (D * N * H + N * H * D + 3 * D * F)
  if attention:
    f += J * 4 * N * H * n
  return f + flops.lm_head_flops_per_token(cfg)


def swiftkv_method(cfg: ModelConfig, base: Params, skv: SwiftKVParams) -> ttft.Method:
  k = cutoff(cfg, skv)
  return ttft.Method(
      name="swiftkv", aux=None,
      prefill=lambda tokens, starts, max_len: swiftkv_prefill(cfg, base, skv, tokens, starts, max_len=max_len),
      step=lambda tokens, state: swiftkv_step(cfg, base, skv, tokens, state),
      ttft_flops=lambda n: float(swiftkv_flops(cfg, k, n)),
      ttft_flops_paper=lambda n: float(swiftkv_flops(cfg, k, n, attention=False)),
      settings={"cutoff": round(k / cfg.num_layers, 4), "k": k})
