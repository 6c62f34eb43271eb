"""Auxiliary models for KV Prediction and the layer maps that tie them to the base.

- KVP-LP: a layer-pruned copy of the base initialised from its weights (its own copy of embeddings and head).
- KVP-C: any smaller decoder that shares the base's vocabulary.
Layer map m: a tuple of length n_base; base layer i is predicted from aux layer m[i] (METHOD.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvp_jax.models.config import ModelConfig
from kvp_jax.models.params import Params
from kvp_jax.models.params import init as init_params

LP_FRACTIONS = (0.25, 0.5, 0.75)


def lp_keep_layers(num_layers: int, fraction: float) -> tuple[int, ...]:
  """The paper's KVP-LP rules: 0.25 keeps every 4th layer, 0.50 every 2nd, 0.75 drops layers with i % 4 == 3."""
  if fraction == 1.0:
    return tuple(range(num_layers))
  rules = {0.25: lambda i: i % 4 == 0, 0.5: lambda i: i % 2 == 0, 0.75: lambda i: i % 4 != 3}
  if fraction not in rules:
    raise ValueError(f"KVP-LP keep fraction must be one of {LP_FRACTIONS} (or 1.0), got {fraction}; "
                     "pass an explicit list of kept layers instead")
  return tuple(i for i in range(num_layers) if rules[fraction](i))


def prune_layers(cfg: ModelConfig, params: Params, keep: tuple[int, ...]) -> tuple[ModelConfig, Params]:
  """A layer-pruned copy of (cfg, params) keeping base layers `keep` (sorted, unique); arrays are copied."""
  keep = tuple(sorted(set(int(i) for i in keep)))
  if not keep or keep[0] < 0 or keep[-1] >= cfg.num_layers:
    raise ValueError(f"kept layers {keep} must be a non-empty subset of 0..{cfg.num_layers - 1}")
  copy = lambda t: jax.tree.map(jnp.array, t)  # own copies, so training the aux never aliases the base
  aux_params = Params(embed=copy(params.embed), layers=tuple(copy(params.layers[i]) for i in keep),
                      final_norm=copy(params.final_norm), lm_head=copy(params.lm_head))
  return cfg.replace(num_layers=len(keep)), aux_params


def lp_layer_map(num_base_layers: int, keep: tuple[int, ...]) -> tuple[int, ...]:
  """Base layer i uses the aux layer copied from the largest kept base layer <= i."""
  keep = tuple(sorted(keep))
  if keep[0] != 0:
    raise ValueError(f"KVP-LP must keep base layer 0 so every base layer has a source; kept {keep}")
  out, j = [], 0
  for i in range(num_base_layers):
    while j + 1 < len(keep) and keep[j + 1] <= i:
      j += 1
    out.append(j)
  return tuple(out)


def c_layer_map(num_base_layers: int, num_aux_layers: int) -> tuple[int, ...]:
  """Each aux layer feeds floor or ceil(n_B / n_A) consecutive base layers, the larger groups first."""
  q, r = divmod(num_base_layers, num_aux_layers)
  out = []
  for j in range(num_aux_layers):
    out += [j] * (q + 1 if j < r else q)
  return tuple(out)


def check_layer_map(layer_map, num_base_layers: int, num_aux_layers: int) -> tuple[int, ...]:
  layer_map = tuple(int(i) for i in layer_map)
  if len(layer_map) != num_base_layers:
    raise ValueError(f"layer map has {len(layer_map)} entries; the base has {num_base_layers} layers")
  bad = [i for i in layer_map if not 0 <= i < num_aux_layers]
  if bad:
    raise ValueError(f"layer map refers to aux layer {bad[0]}; the aux model has {num_aux_layers} layers")
  return layer_map


def check_compatible(base_cfg: ModelConfig, aux_cfg: ModelConfig, base_tokenizer=None, aux_tokenizer=None):
  """Base and aux must share a vocabulary: the aux reads the same prompt ids the base will continue.

  Their embedding tables may differ in length only when both tokenizers are given, map tokens to the same ids,
  and fit both tables: checkpoints pad the table to a multiple of their own (Qwen2.5-0.5B keeps 151936 rows,
  Qwen2.5-7B 152064, for one 151665-token tokenizer), and the rows past the tokenizer are never read."""
  same_tok = None
  if base_tokenizer is not None and aux_tokenizer is not None:
    same_tok = base_tokenizer.get_vocab() == aux_tokenizer.get_vocab()
    if not same_tok:
      raise ValueError("tokenizer mismatch: base and aux tokenizers map tokens to different ids; "
                       "use an aux model trained with the base's tokenizer")
  if base_cfg.vocab_size != aux_cfg.vocab_size:
    n = len(base_tokenizer) if same_tok else None
    if n is None or n > min(base_cfg.vocab_size, aux_cfg.vocab_size):
      raise ValueError(f"vocab mismatch: base has {base_cfg.vocab_size} tokens, aux {aux_cfg.vocab_size}; "
                       "KV Prediction needs an aux model with the base's tokenizer (embedding tables of other "
                       "lengths pass only when both tokenizers are found, agree and fit both)")


@dataclasses.dataclass(frozen=True)
class AuxSpec:
  kind: str = "lp"  # "lp": layer-pruned base; "c": a separate smaller model
  lp_keep_fraction: float = 0.5
  lp_keep_layers: tuple[int, ...] | None = None
  checkpoint: str | None = None  # for "c": a pretrain workdir or Hugging Face dir
  model: dict | None = None  # for "c" from scratch: ModelConfig fields


def build_aux(spec: AuxSpec, base_cfg: ModelConfig, base: Params, seed: int = 0, aux_model=None,
              tokenizers=(None, None)):
  """(aux_cfg, aux_params, default layer map).

  aux_model: the (cfg, params) of a KVP-C aux read from `spec.checkpoint` by the caller (the checkpoint code
  lives below this module: kvp_jax.models.checkpoints.load_model), or None to build one from `spec.model`.
  tokenizers: (base's, aux's), when known: `check_compatible` then also compares them.
  """
  if spec.kind == "lp":
    keep = spec.lp_keep_layers or lp_keep_layers(base_cfg.num_layers, spec.lp_keep_fraction)
    aux_cfg, aux = prune_layers(base_cfg, base, keep)
    return aux_cfg, aux, lp_layer_map(base_cfg.num_layers, keep)
  if spec.kind != "c":
    raise ValueError(f"unknown aux kind {spec.kind!r}; choose 'lp' or 'c'")
  if aux_model is not None:
    aux_cfg, aux = aux_model
  elif spec.checkpoint:
    raise ValueError(f"aux checkpoint {spec.checkpoint} was not loaded; pass aux_model=load_model(path)")
  elif spec.model:
    aux_cfg = ModelConfig.from_dict({"vocab_size": base_cfg.vocab_size, **spec.model})
    aux = init_params(aux_cfg, jax.random.PRNGKey(seed + 1))
  else:
    raise ValueError("--aux=c needs --aux_checkpoint or --aux_model")
  check_compatible(base_cfg, aux_cfg, *tokenizers)
  return aux_cfg, aux, c_layer_map(base_cfg.num_layers, aux_cfg.num_layers)
