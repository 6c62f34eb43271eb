"""KV predictors: per base layer, linear maps (with bias) from auxiliary features to the base's K and V.

Kinds
- "kv": from the flattened K (resp. V) of aux layer m(i): [B, T, K_a*H_a] -> [B, T, K_b*H_b] (KV Prediction).
- "activation": from the normalised residual stream entering aux layer m(i), the input of its q/k/v
  projections: [B, T, D_a] -> [B, T, K_b*H_b] for K and for V (kvfun's "Cache Me If You Can").
Predicted keys are *pre-RoPE and pre-key-norm*; the base applies both at the true positions
(`cache.keys_to_cache`). Weights are stacked over base layers so all L_B maps run as one batched matmul.
Shape legend: see kvp_jax/config.py; I predictor input width, O = K_b * H_b.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kvp_jax.config import ModelConfig
from kvp_jax.model import ForwardOut, LayerKV

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


def aux_features(kcfg: KVPConfig, aux_out: ForwardOut):
  """Stacked inputs for the K and V maps of every base layer: two [L_B, B, T, I] arrays."""
  m = kcfg.layer_map
  if kcfg.kind == "kv":
    flat = lambda x: x.reshape(*x.shape[:2], -1)
    fk = jnp.stack([flat(aux_out.kv[j].k) for j in m])
    fv = jnp.stack([flat(aux_out.kv[j].v) for j in m])
    return fk, fv
  x = jnp.stack([aux_out.inputs[j] for j in m])
  return x, x


def predict(kcfg: KVPConfig, pp: PredictorParams, aux_out: ForwardOut) -> tuple[LayerKV, ...]:
  """Predicted base K (pre-RoPE, pre-key-norm) and V per base layer, each [B, T, K_b, H_b]."""
  fk, fv = aux_features(kcfg, aux_out)
  L, B, T, I = fk.shape
  # B and T flattened into one row axis M: one contraction axis, so the weight gradient ("LMI,LMO->LIO") is a
  # plain batched matmul on XLA:CPU (see kvp_jax/layers.py, `dense`).
  proj = lambda f, w, b: (jnp.einsum("LMI,LIO->LMO", f.reshape(L, B * T, I), w.astype(f.dtype))
                          + b[:, None].astype(f.dtype))
  k = proj(fk, pp.wk, pp.bk)
  v = proj(fv, pp.wv, pp.bv)
  shape = (B, T, kcfg.base.num_kv_heads, kcfg.base.head_dim)
  return tuple(LayerKV(k[i].reshape(shape), v[i].reshape(shape)) for i in range(kcfg.base.num_layers))


def collect_flags(kind: str) -> dict:
  """What the aux forward pass must collect for this predictor kind."""
  return {"collect_kv": kind == "kv", "collect_inputs": kind == "activation"}
