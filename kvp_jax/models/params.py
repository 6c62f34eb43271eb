"""Decoder parameters: registered-dataclass pytrees, each parameter described once.

`param_specs(cfg)` describes every array (shape, logical axes, initializer); `init`, `abstract` and
`logical_axes` are all derived from it, so a new parameter is added in exactly one place.
Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kvp_jax.models.config import ModelConfig


def _pytree(cls):
  """Frozen dataclass registered as a pytree; every field is a child (None children are empty subtrees)."""
  cls = dataclasses.dataclass(frozen=True)(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  return jax.tree_util.register_dataclass(cls, data_fields=names, meta_fields=[])


@_pytree
class LayerParams:
  attn_norm: Any  # [D]
  wq: Any  # [D, N, H]
  wk: Any  # [D, K, H]
  wv: Any  # [D, K, H]
  wo: Any  # [N, H, D]
  bq: Any  # [N, H] or None (Qwen2 bias)
  bk: Any  # [K, H] or None
  bv: Any  # [K, H] or None
  q_norm: Any  # [H] or None (Qwen3)
  k_norm: Any  # [H] or None
  mlp_norm: Any  # [D]
  w_gate: Any  # [D, F]
  w_up: Any  # [D, F]
  w_down: Any  # [F, D]


@_pytree
class Params:
  embed: Any  # [V, D]
  layers: tuple  # L x LayerParams (a tuple, so layers may be pruned, reordered or mapped freely)
  final_norm: Any  # [D]
  lm_head: Any  # [D, V] or None when tied to `embed`

  def replace(self, **kw) -> "Params":
    return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
  shape: tuple[int, ...]
  axes: tuple[str, ...]  # logical axis names, mapped to mesh axes by kvp_jax/training/sharding.py
  init: str  # "normal" (scaled by fan-in), "ones", "zeros", "embed"
  fan_in: int = 1


def _layer_specs(cfg: ModelConfig) -> LayerParams:
  D, F, N, K, H = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  bias = cfg.attention_bias
  return LayerParams(
      attn_norm=ParamSpec((D,), ("embed",), "ones"),
      wq=ParamSpec((D, N, H), ("embed", "heads", "head_dim"), "normal", D),
      wk=ParamSpec((D, K, H), ("embed", "kv_heads", "head_dim"), "normal", D),
      wv=ParamSpec((D, K, H), ("embed", "kv_heads", "head_dim"), "normal", D),
      wo=ParamSpec((N, H, D), ("heads", "head_dim", "embed"), "normal", N * H),
      bq=ParamSpec((N, H), ("heads", "head_dim"), "zeros") if bias else None,
      bk=ParamSpec((K, H), ("kv_heads", "head_dim"), "zeros") if bias else None,
      bv=ParamSpec((K, H), ("kv_heads", "head_dim"), "zeros") if bias else None,
      q_norm=ParamSpec((H,), ("head_dim",), "ones") if cfg.qk_norm else None,
      k_norm=ParamSpec((H,), ("head_dim",), "ones") if cfg.qk_norm else None,
      mlp_norm=ParamSpec((D,), ("embed",), "ones"),
      w_gate=ParamSpec((D, F), ("embed", "mlp"), "normal", D),
      w_up=ParamSpec((D, F), ("embed", "mlp"), "normal", D),
      w_down=ParamSpec((F, D), ("mlp", "embed"), "normal", F),
  )


def param_specs(cfg: ModelConfig) -> Params:
  D, V = cfg.hidden_size, cfg.vocab_size
  return Params(
      embed=ParamSpec((V, D), ("vocab", "embed"), "embed"),
      layers=tuple(_layer_specs(cfg) for _ in range(cfg.num_layers)),
      final_norm=ParamSpec((D,), ("embed",), "ones"),
      lm_head=None if cfg.tie_word_embeddings else ParamSpec((D, V), ("embed", "vocab"), "normal", D),
  )


def _is_spec(x) -> bool:
  return isinstance(x, ParamSpec)


def map_specs(fn: Callable[[ParamSpec], Any], specs) -> Any:
  return jax.tree.map(fn, specs, is_leaf=_is_spec)


def abstract(cfg: ModelConfig, dtype=jnp.float32) -> Params:
  """ShapeDtypeStructs of every parameter, allocating nothing."""
  return map_specs(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_specs(cfg))


def logical_axes(cfg: ModelConfig) -> Params:
  return map_specs(lambda s: s.axes, param_specs(cfg))


def init(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32) -> Params:
  """Random initialisation (normal / sqrt(fan_in); embeddings N(0, 1/sqrt(D)) so tied heads start sane)."""
  specs = param_specs(cfg)
  leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
  keys = jax.random.split(key, len(leaves))

  def make(spec: ParamSpec, k):
    if spec.init == "ones":
      return jnp.ones(spec.shape, dtype)
    if spec.init == "zeros":
      return jnp.zeros(spec.shape, dtype)
    scale = 1.0 / (cfg.hidden_size ** 0.5 if spec.init == "embed" else spec.fan_in ** 0.5)
    return (jax.random.normal(k, spec.shape, jnp.float32) * scale).astype(dtype)

  return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def lm_head_weight(params: Params):
  """[D, V] output projection, the transposed embedding when tied."""
  return params.embed.T if params.lm_head is None else params.lm_head


def count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def cast(params, dtype):
  return jax.tree.map(lambda x: x.astype(dtype), params)
