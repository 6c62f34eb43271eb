"""Closed-form initialisation of the KV predictor by ridge least squares (`--predictor_init=lstsq`).

For base layer i, fed by aux layer j = m(i), the K map [W; b] minimises over the fitting tokens
    sum_t |x_j(t) W + b - k_i(t)|^2 + ridge * s_j * |W|^2
where x_j(t) is aux layer j's feature of token t (its flattened K, or its normalised input for the "activation"
kind), k_i(t) the base's own key of that token before key norm and RoPE (where the predictor writes), and
s_j = trace(X_j^T X_j) / I makes `ridge` relative to the features' scale; the bias is not penalised. Values
alike. The solution comes from the normal equations, so only sums are kept: per aux layer the Gram matrix of
[x, 1] ([I+1, I+1]), per base layer the cross moment with the targets ([I+1, O]) and the targets' squares.
They are summed chunk by chunk (one forward pass of aux and base per chunk, float64 on the host), so memory
stays at a few predictor-sized matrices whatever the number of tokens.
Shape legend: see kvp_jax/models/config.py; here also I predictor input width, O = K_b * H_b, A aux layers used,
N tokens of a chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from kvp_jax.kvp import predictor
from kvp_jax.kvp.predictor import KVPConfig, PredictorParams
from kvp_jax.models import decoder
from kvp_jax.models.params import Params


@dataclasses.dataclass
class Moments:
  """Sums over fitting tokens, float64: Gram matrices of the K and V features with a ones column [A, I+1, I+1],
  cross moments with the base's K and V [L_B, I+1, O], the targets' squares [L_B], and the token count."""
  xtx_k: np.ndarray
  xtx_v: np.ndarray
  xty_k: np.ndarray
  xty_v: np.ndarray
  yy_k: np.ndarray
  yy_v: np.ndarray
  count: float = 0.0

  @classmethod
  def zeros(cls, kcfg: KVPConfig) -> "Moments":
    A, L, I, O = len(set(kcfg.layer_map)), kcfg.base.num_layers, kcfg.in_width + 1, kcfg.out_width
    z = lambda *s: np.zeros(s, np.float64)
    return cls(z(A, I, I), z(A, I, I), z(L, I, O), z(L, I, O), z(L), z(L))

  def add(self, chunk: dict) -> "Moments":
    for f in ("xtx_k", "xtx_v", "xty_k", "xty_v", "yy_k", "yy_v"):
      setattr(self, f, getattr(self, f) + np.asarray(chunk[f], np.float64))
    self.count += float(chunk["count"])
    return self


def _with_ones(x_NI, w_N):
  """[x, 1] with masked rows zeroed: [N, I+1]."""
  return jnp.concatenate([x_NI, jnp.ones_like(x_NI[:, :1])], axis=1) * w_N[:, None]


def chunk_moments_from(features_k, features_v, targets, mask_N):
  """Moments of one chunk from plain arrays: features per aux layer ([N, I] each, A of them), targets per base
  layer as (aux index a, k [N, O], v [N, O]) (float32 sums; the caller adds them up in float64)."""
  w = mask_N.astype(jnp.float32)
  xk = [_with_ones(f.astype(jnp.float32), w) for f in features_k]
  xv = [_with_ones(f.astype(jnp.float32), w) for f in features_v]
  gram = lambda x: jnp.einsum("ni,nj->ij", x, x)
  cross = lambda x, y: jnp.einsum("ni,no->io", x, y.astype(jnp.float32))
  sq = lambda y: jnp.sum(jnp.square(y.astype(jnp.float32)) * w[:, None])
  return {"xtx_k": jnp.stack([gram(x) for x in xk]), "xtx_v": jnp.stack([gram(x) for x in xv]),
          "xty_k": jnp.stack([cross(xk[a], k) for a, k, _ in targets]),
          "xty_v": jnp.stack([cross(xv[a], v) for a, _, v in targets]),
          "yy_k": jnp.stack([sq(k) for _, k, _ in targets]), "yy_v": jnp.stack([sq(v) for _, _, v in targets]),
          "count": jnp.sum(w)}


@functools.partial(jax.jit, static_argnames=("kcfg",))
def chunk_moments(kcfg: KVPConfig, base: Params, aux: Params, tokens_BT, mask_BT):
  """One chunk: the aux's features and the base's own pre-RoPE K/V of the same tokens, reduced to moments."""
  pos = decoder.default_positions(tokens_BT)
  aux_out = decoder.forward_layers(kcfg.aux, aux, tokens_BT, pos, compute_logits=False,
                                   **predictor.collect_flags(kcfg.kind))
  true = decoder.forward_layers(kcfg.base, base, tokens_BT, pos, collect_kv=True, compute_logits=False).kv
  used = sorted(set(kcfg.layer_map))
  flat = lambda x: x.reshape(-1, x.shape[-1] if x.ndim == 3 else x.shape[-2] * x.shape[-1])
  feats = [predictor.aux_features(kcfg, aux_out, j) for j in used]
  targets = [(used.index(j), flat(t.k), flat(t.v)) for j, t in zip(kcfg.layer_map, true)]
  return chunk_moments_from([flat(fk) for fk, _ in feats], [flat(fv) for _, fv in feats], targets,
                            mask_BT.reshape(-1))


def solve(m: Moments, layer_map: tuple[int, ...], ridge: float) -> tuple[np.ndarray, ...]:
  """(wk [L, I, O], bk [L, O], wv, bv, r2_k [L], r2_v [L]) from the moments; r2 is the share of the targets'
  variance (about their mean, over all fitting tokens and dims) the fit explains on those same tokens."""
  used = sorted(set(layer_map))
  out = {}
  for part in ("k", "v"):
    xtx, xty, yy = getattr(m, f"xtx_{part}"), getattr(m, f"xty_{part}"), getattr(m, f"yy_{part}")
    ws, r2 = [], []
    for i, j in enumerate(layer_map):
      g = xtx[used.index(j)]
      I = g.shape[0] - 1
      scale = max(np.trace(g[:I, :I]) / max(I, 1), 1e-12)
      reg = np.diag(np.r_[np.full(I, ridge * scale), 0.0])
      w = np.linalg.solve(g + reg, xty[i])  # [I+1, O]
      ws.append(w)
      sse = yy[i] - 2 * np.sum(w * xty[i]) + np.sum(w * (g @ w))
      mean = xty[i][-1] / max(m.count, 1.0)  # the ones column's cross moment is the targets' sum
      sst = yy[i] - m.count * np.sum(mean ** 2)
      r2.append(1.0 - sse / max(sst, 1e-12))
    ws = np.stack(ws)
    out[part] = (ws[:, :-1].astype(np.float32), ws[:, -1].astype(np.float32), np.asarray(r2))
  return out["k"][0], out["k"][1], out["v"][0], out["v"][1], out["k"][2], out["v"][2]


def fit(kcfg: KVPConfig, base: Params, aux: Params, batches: Iterable, *, num_tokens: int, ridge: float = 1e-3,
        log: Callable[[str], None] | None = None) -> tuple[PredictorParams, dict]:
  """Predictor params fitted on the first `num_tokens` tokens of `batches` (int [B, T] token arrays, or dicts
  with "inputs" and optionally "mask"), and a summary {tokens, ridge, r2_k, r2_v, seconds}."""
  if num_tokens < 1:
    raise ValueError(f"lstsq needs at least one fitting token, got num_tokens={num_tokens}")
  m = Moments.zeros(kcfg)
  t0 = time.time()
  for b in batches:
    tokens = b["inputs"] if isinstance(b, dict) else b
    mask = b.get("mask") if isinstance(b, dict) else None
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    m.add(jax.device_get(chunk_moments(kcfg, base, aux, tokens, mask)))
    if log:
      done = min(m.count / num_tokens, 1.0)
      eta = (time.time() - t0) * (1 - done) / max(done, 1e-9)
      log(f"lstsq: {int(m.count)}/{num_tokens} tokens, ETA {int(eta) // 60}m{int(eta) % 60:02d}s")
    if m.count >= num_tokens:
      break
  if m.count == 0:
    raise ValueError("lstsq got no fitting tokens; the data iterator is empty")
  wk, bk, wv, bv, r2k, r2v = solve(m, kcfg.layer_map, ridge)
  pp = PredictorParams(wk=jnp.asarray(wk), bk=jnp.asarray(bk), wv=jnp.asarray(wv), bv=jnp.asarray(bv))
  return pp, {"tokens": int(m.count), "ridge": ridge, "r2_k": r2k.tolist(), "r2_v": r2v.tolist(),
              "seconds": time.time() - t0}
