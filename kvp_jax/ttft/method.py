"""The one interface every TTFT method implements, so evaluation and benchmarks treat them alike.

A method turns a left-padded prompt batch into the first token's logits and a decoding state (`prefill`), then
advances one token at a time (`step`); greedy generation (here) and teacher-forced scoring
(kvp_jax/evaluation/scoring.py) are built on those two.
It also counts its TTFT FLOPs analytically, ours (everything, attention included) and the paper's
(N x aux cost per token). This module sits below every method: a plain decoder is `model_method` here (the base,
an aux alone, a layer-pruned model alone); KV Prediction's adapter is `kvp.inference.kvp_method`, the others'
sit beside them in kvp_jax/baselines/. Names follow report.json: base, aux_only, lp_alone, kvp, kvp_recompute,
lazyllm, random_prune, static_prune, ...
Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kvp_jax.models import decoder, flops
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.params import Params


@dataclasses.dataclass
class Method:
  name: str  # base | aux_only | lp_alone | kvp | kvp_recompute | lazyllm | random_prune | static_prune
  aux: str | None  # which auxiliary model (c, lp0.25, ...); None for the base
  prefill: Callable  # (tokens [B,T], starts [B], max_len) -> (logits [B,V], state)
  step: Callable  # (tokens [B,1], state) -> (logits [B,V], state); donates `state`: pass each state once
  ttft_flops: Callable[[int], float]  # prompt length -> FLOPs per prompt (ours)
  ttft_flops_paper: Callable[[int], float]
  settings: dict = dataclasses.field(default_factory=dict)

  @property
  def label(self) -> str:
    extra = ",".join(f"{k}={v}" for k, v in self.settings.items())
    return self.name + (f"[{self.aux}]" if self.aux else "") + (f"({extra})" if extra else "")


def _model_prefill(cfg: ModelConfig, params: Params):
  fn = jax.jit(functools.partial(decoder.prefill, cfg), static_argnames=("max_len",))
  return lambda tokens, starts, max_len: fn(params, tokens, starts, max_len=max_len)


def decoder_step(cfg: ModelConfig, params: Params):
  """A plain decoder's cached step (the base's decode after any prefill that leaves it a KVCache).

  Every method's step donates its state (a caller passes each state once, as generation and scoring do): without
  donation the step writes a new cache, a copy of the whole old one, which made SmolLM2's B=16 step 1.5x slower."""
  return lambda tokens, state: decoder.decode_step(cfg, params, tokens, state)


def paper_flops(cfg: ModelConfig, n: int) -> float:
  return float(flops.paper_ttft_flops(cfg, n))


def model_method(name: str, cfg: ModelConfig, params: Params, aux: str | None = None) -> Method:
  """A decoder on its own (the base, an aux model alone, a layer-pruned model fine-tuned alone)."""
  return Method(name=name, aux=aux, prefill=_model_prefill(cfg, params), step=decoder_step(cfg, params),
                ttft_flops=lambda n: float(flops.prefill_flops(cfg, n)),
                ttft_flops_paper=lambda n: paper_flops(cfg, n))


def greedy(method: Method, tokens_BT, starts_B, max_new_tokens: int, stop_tokens=()) -> np.ndarray:
  """[B, n] greedy continuation; rows stop at a stop token (the rest padded with it). Host loop: eval only."""
  T = tokens_BT.shape[1]
  logits, state = method.prefill(jnp.asarray(tokens_BT), jnp.asarray(starts_B), T + max_new_tokens)
  out, done = [], np.zeros(tokens_BT.shape[0], bool)
  stops = np.asarray(list(stop_tokens), np.int32)
  for i in range(max_new_tokens):
    nxt = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
    if len(out) and stops.size:
      nxt = np.where(done, out[-1], nxt)
    out.append(nxt)
    done |= np.isin(nxt, stops)
    if done.all() or i == max_new_tokens - 1:
      break
    logits, state = method.step(jnp.asarray(nxt[:, None]), state)
  return np.stack(out, 1)
