"""KV predictors: per base layer, linear maps (with bias) from auxiliary features to the base's K and V.

Kinds
- "kv": from the flattened K (resp. V) of aux layer m(i): [B, T, K_a*H_a] -> [B, T, K_b*H_b] (KV Prediction).
- "activation": from the normalised residual stream entering aux layer m(i), the input of its q/k/v
  projections: [B, T, D_a] -> [B, T, K_b*H_b] for K and for V (kvfun's "Cache Me If You Can").
Predicted keys are *pre-RoPE and pre-key-norm*; the base applies both at the true positions
(`cache.keys_to_cache`). Weights are stored stacked over base layers, [L_B, I, O]; `predict` runs one matmul
per aux layer, for all the base layers that aux layer feeds.
Shape legend: see kvp_jax/models/config.py; I predictor input width, O = K_b * H_b.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kvp_jax.models.config import ModelConfig
from kvp_jax.models.decoder import ForwardOut, LayerKV
from kvp_jax.models.layers import dense

KINDS = ("kv", "activation")
INITS = ("identity", "random")


@dataclasses.dataclass(frozen=True)
class KVPConfig:
  """Everything static about a base + aux + predictor triple (hashable: passes through jit)."""
  base: ModelConfig
  aux: ModelConfig
  kind: str = "kv"
  layer_map: tuple[int, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown predictor kind {self.kind!r}; choose one of {KINDS}")
    if len(self.layer_map) != self.base.num_layers:
      raise ValueError(f"layer_map has {len(self.layer_map)} entries for a {self.base.num_layers}-layer base")

  @property
  def in_width(self) -> int:
    return self.aux.kv_width if self.kind == "kv" else self.aux.hidden_size

  @property
  def out_width(self) -> int:
    return self.base.kv_width

  def to_dict(self) -> dict:
    return {"base": self.base.to_dict(), "aux": self.aux.to_dict(), "kind": self.kind,
            "layer_map": list(self.layer_map)}

  @classmethod
  def from_dict(cls, d: dict) -> "KVPConfig":
    return cls(base=ModelConfig.from_dict(d["base"]), aux=ModelConfig.from_dict(d["aux"]), kind=d["kind"],
               layer_map=tuple(d["layer_map"]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PredictorParams:
  wk: Any  # [L_B, I, O]
  bk: Any  # [L_B, O]
  wv: Any  # [L_B, I, O]
  bv: Any  # [L_B, O]


def logical_axes(kcfg: KVPConfig) -> PredictorParams:
  """Logical axes of each weight (kvp_jax/training/sharding.py maps them to mesh axes)."""
  return PredictorParams(wk=("layers", "pred_in", "pred_out"), bk=("layers", "pred_out"),
                         wv=("layers", "pred_in", "pred_out"), bv=("layers", "pred_out"))


def init(kcfg: KVPConfig, key, dtype=jnp.float32, how: str = "identity") -> PredictorParams:
  """'identity' (where I == O: starts by copying the aux's K/V, the natural start for KVP-LP) or 'random'."""
  if how not in INITS:
    raise ValueError(f"unknown predictor init {how!r}; choose one of {INITS}")
  L, I, O = kcfg.base.num_layers, kcfg.in_width, kcfg.out_width
  if how == "identity" and I == O:
    w = jnp.broadcast_to(jnp.eye(I, dtype=dtype), (L, I, O))
    wk = wv = w
  else:
    k1, k2 = jax.random.split(key)
    wk = (jax.random.normal(k1, (L, I, O)) * I ** -0.5).astype(dtype)
    wv = (jax.random.normal(k2, (L, I, O)) * I ** -0.5).astype(dtype)
  zeros = jnp.zeros((L, O), dtype)
  return PredictorParams(wk=jnp.array(wk), bk=zeros, wv=jnp.array(wv), bv=jnp.array(zeros))


def aux_features(kcfg: KVPConfig, aux_out: ForwardOut, j: int):
  """Aux layer j's inputs for the K and V maps: two [B, T, I] arrays (its flattened K and V, or its
  normalised input twice)."""
  if kcfg.kind == "kv":
    flat = lambda x: x.reshape(*x.shape[:2], -1)
    return flat(aux_out.kv[j].k), flat(aux_out.kv[j].v)
  return aux_out.inputs[j], aux_out.inputs[j]


def predict(kcfg: KVPConfig, pp: PredictorParams, aux_out: ForwardOut) -> tuple[LayerKV, ...]:
  """Predicted base K (pre-RoPE, pre-key-norm) and V per base layer, each [B, T, K_b, H_b].

  Per aux layer j, one matmul maps its features for every base layer it feeds (their [I, O] maps side by
  side, [I, n_j * O]): no copy of the aux K/V per base layer, and fewer, wider matmuls.
  """
  m = kcfg.layer_map
  shape = (kcfg.base.num_kv_heads, kcfg.base.head_dim)
  out: list[LayerKV | None] = [None] * len(m)
  for j in sorted(set(m)):
    idx = [i for i, a in enumerate(m) if a == j]
    fk, fv = aux_features(kcfg, aux_out, j)

    def project(f, w_LIO, b_LO):
      w = jnp.concatenate([w_LIO[i] for i in idx], axis=1).astype(f.dtype)  # [I, n_j * O]
      b = jnp.concatenate([b_LO[i] for i in idx]).astype(f.dtype)
      y = dense(f, w) + b  # [B, T, n_j * O]
      return jnp.split(y, len(idx), axis=-1)

    for i, k, v in zip(idx, project(fk, pp.wk, pp.bk), project(fv, pp.wv, pp.bv)):
      out[i] = LayerKV(k.reshape(*k.shape[:2], *shape), v.reshape(*v.shape[:2], *shape))
  return tuple(out)


def collect_flags(kind: str) -> dict:
  """What the aux forward pass must collect for this predictor kind."""
  return {"collect_kv": kind == "kv", "collect_inputs": kind == "activation"}
