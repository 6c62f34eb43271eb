"""Model configuration: one frozen, hashable dataclass that passes through `jax.jit` as a static argument.

Shape legend (used in names and einsum strings across kvp_jax):
  B batch, T query length, S key/cache length, D model width, F MLP width, N query heads, K kv heads,
  G query groups per kv head (N = K * G), H head dim, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency scaling (`rope_scaling.rope_type == "llama3"` in Hugging Face configs)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  hidden_size: int  # D
  intermediate_size: int  # F
  num_layers: int  # L
  num_heads: int  # N
  num_kv_heads: int  # K
  head_dim: int  # H; independent of D / N (Qwen3 uses 128 with D / N = 64 in some sizes)
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # q/k/v projection bias (Qwen2)
  qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
  max_position_embeddings: int = 4096
  architecture: str = "llama"
  bos_token_id: int | None = None
  eos_token_id: tuple[int, ...] = ()

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (grouped-query attention)")

  @property
  def groups(self) -> int:  # G
    return self.num_heads // self.num_kv_heads

  @property
  def kv_width(self) -> int:
    """Width of one layer's flattened K (or V) per token: K * H."""
    return self.num_kv_heads * self.head_dim

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["eos_token_id"] = list(self.eos_token_id)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    d["eos_token_id"] = tuple(d.get("eos_token_id") or ())
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown model config keys {sorted(unknown)}; expected a subset of {sorted(known)}")
    return cls(**d)

  def num_params(self) -> int:
    D, F, N, K, H, V, L = (self.hidden_size, self.intermediate_size, self.num_heads, self.num_kv_heads,
                           self.head_dim, self.vocab_size, self.num_layers)
    per_layer = D * (N + 2 * K) * H + N * H * D + 3 * D * F + 2 * D
    if self.attention_bias:
      per_layer += (N + 2 * K) * H
    if self.qk_norm:
      per_layer += 2 * H
    return V * D * (1 if self.tie_word_embeddings else 2) + L * per_layer + D


def tiny_config(**overrides) -> ModelConfig:
  """A small config for tests and smoke runs."""
  base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=16, max_position_embeddings=512)
  base.update(overrides)
  return ModelConfig(**base)
