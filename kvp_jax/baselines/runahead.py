"""KV-Runahead (Cho et al., ICML 2024): chain-parallel prefill over the `seq` axis of a device mesh.

The prompt's T slots are cut into p contiguous chunks, chunk j = slots [offs[j], offs[j+1]) on device j of the
`seq` axis. Per layer, every device projects its own chunk's Q/K/V; then the K/V prefix travels down the chain:
in round r (r = 1..p-1) device r-1 sends the K/V of slots [0, offs[r]) (its prefix plus its own chunk) to
device r with one `jax.lax.ppermute` pair, point to point, never an all-gather; each device then attends its
queries causally to everything before and in its chunk. The last device ends holding the whole cache and emits
the first token. Chunks may be uneven (later chunks attend to more keys, so they are made shorter:
kvp_jax/baselines/runahead_cost.py chooses them from measured per-chunk times).

Inside `jax.shard_map` every device runs one program with one block shape, so chunks are padded to the longest
one, C; each device's own work (projections, attention, MLP) runs in a `lax.switch` branch with its chunk's
static length and key count, so a short chunk costs what it should, not what the longest one does.

Also KV Prediction's aux prefill: `kvp_runahead_prefill` runs the aux model this way over the first T-1 prompt
tokens and applies the predictor to each device's chunk (it is position-wise), then the base's last-token step.
Shape legend: see kvp_jax/models/config.py; p devices on the seq axis, C the longest chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as Pspec

from kvp_jax.kvp import inference, predictor
from kvp_jax.kvp.predictor import KVPConfig
from kvp_jax.models import attention, decoder, flops
from kvp_jax.models import cache as kv_cache
from kvp_jax.models.cache import KVCache
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.layers import rms_norm
from kvp_jax.models.params import Params
from kvp_jax.ttft import method as ttft

AXIS = "seq"


def even_chunks(T: int, p: int) -> tuple[int, ...]:
  """p chunk lengths summing to T, the first T % p one longer."""
  if not 1 <= p <= T:
    raise ValueError(f"cannot cut {T} prompt tokens into {p} non-empty chunks")
  return tuple(T // p + (i < T % p) for i in range(p))


def check_chunks(chunks, T: int, p: int) -> tuple[int, ...]:
  chunks = tuple(int(c) for c in chunks)
  if len(chunks) != p or sum(chunks) != T or min(chunks) < 1:
    raise ValueError(f"chunks {chunks} must be {p} positive lengths (one per device on the '{AXIS}' axis) "
                     f"summing to the prompt length {T}")
  return chunks


def _pad_rows(x, C: int):
  """[B, n, ...] -> [B, C, ...] with zeros after row n."""
  return jnp.pad(x, [(0, 0), (0, C - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def project_chunk(cfg: ModelConfig, lp, x_BnD, pos_Bn):
  """A device's first half of a layer: rotated queries [B, n, N, H], cache-ready keys [B, n, K, H], values, and
  what a KV predictor reads (pre-RoPE keys, the normalised input)."""
  h = rms_norm(x_BnD, lp.attn_norm, cfg.rms_norm_eps)
  q, k, v = decoder.project_qkv(cfg, lp, h)
  q = decoder.rotate_queries(cfg, lp, q, pos_Bn)
  return q, kv_cache.keys_to_cache(cfg, lp.k_norm, k, pos_Bn), v, k, h


def attend_chunk(cfg: ModelConfig, lp, x_BnD, q_BnNH, k_BKSH, v_BKSH, pos_Bn, key_pos_BS):
  """A device's second half of a layer: its queries against the S keys before and in its chunk, then the MLP."""
  o = attention.masked_attention(q_BnNH, k_BKSH, v_BKSH, attention.causal_mask(pos_Bn, key_pos_BS))
  return decoder.attn_out_and_mlp(cfg, lp, x_BnD, o)


def device_layer(cfg: ModelConfig, lp, x_BnD, k_prefix_BKSH, v_prefix_BKSH):
  """One device's whole work in one layer for a chunk of n tokens after S received prefix slots (no padding):
  what the cost model's per-chunk times measure (kvp_jax/benchmark/runahead.py)."""
  S, n = k_prefix_BKSH.shape[2], x_BnD.shape[1]
  pos = jnp.broadcast_to(S + jnp.arange(n, dtype=jnp.int32), x_BnD.shape[:2])
  q, k, v, _, _ = project_chunk(cfg, lp, x_BnD, pos)
  kb = jnp.concatenate([k_prefix_BKSH, jnp.swapaxes(k, 1, 2)], axis=2)
  vb = jnp.concatenate([v_prefix_BKSH, jnp.swapaxes(v, 1, 2)], axis=2)
  key_pos = jnp.broadcast_to(jnp.arange(S + n, dtype=jnp.int32), (x_BnD.shape[0], S + n))
  return attend_chunk(cfg, lp, x_BnD, q, kb, vb, pos, key_pos)


def _chain(cfg: ModelConfig, params: Params, toks_BC, starts_B, chunks, collect: str | None):
  """One device's share of the chain (inside shard_map): (logits [B, V] of its last real token, k [L, B, K, T,
  H], v [L, B, K, T, H] of the slots it holds, collected features [L, 2, B, C, ...] or None)."""
  p, C, T = len(chunks), max(chunks), sum(chunks)
  offs = np.concatenate([[0], np.cumsum(chunks)]).astype(int)
  i = jax.lax.axis_index(AXIS)
  B = toks_BC.shape[0]
  K, H = cfg.num_kv_heads, cfg.head_dim
  slot_pos_BS = jnp.arange(T, dtype=jnp.int32)[None, :] - starts_B[:, None]
  pos_of = lambda j: slot_pos_BS[:, offs[j]:offs[j + 1]]  # [B, n_j] positions of chunk j (static slice)

  x = params.embed[toks_BC]  # [B, C, D]; rows past this device's chunk length are padding, never read
  ks, vs, feats = [], [], []
  for lp in params.layers:
    def project(j, x, kb, vb, lp=lp):
      q, kc, v, k, h = project_chunk(cfg, lp, x[:, :chunks[j]], pos_of(j))
      kb = kb.at[:, :, offs[j]:offs[j + 1]].set(jnp.swapaxes(kc, 1, 2).astype(kb.dtype))
      vb = vb.at[:, :, offs[j]:offs[j + 1]].set(jnp.swapaxes(v, 1, 2).astype(vb.dtype))
      feat = (k, v) if collect == "kv" else (h, h)
      return _pad_rows(q, C), kb, vb, tuple(_pad_rows(f, C) for f in feat)

    kb = jnp.zeros((B, K, T, H), x.dtype)
    vb = jnp.zeros((B, K, T, H), x.dtype)
    q, kb, vb, feat = jax.lax.switch(i, [functools.partial(project, j) for j in range(p)], x, kb, vb)
    for r in range(1, p):  # the chain: round r hands slots [0, offs[r]) from device r-1 to device r
      n = int(offs[r])
      rk = jax.lax.ppermute(kb[:, :, :n], AXIS, [(r - 1, r)])
      rv = jax.lax.ppermute(vb[:, :, :n], AXIS, [(r - 1, r)])
      kb = kb.at[:, :, :n].set(jnp.where(i == r, rk, kb[:, :, :n]))
      vb = vb.at[:, :, :n].set(jnp.where(i == r, rv, vb[:, :, :n]))

    def attend(j, x, q, kb, vb, lp=lp):
      n, end = chunks[j], int(offs[j + 1])
      y = attend_chunk(cfg, lp, x[:, :n], q[:, :n], kb[:, :, :end], vb[:, :, :end], pos_of(j),
                       slot_pos_BS[:, :end])
      return _pad_rows(y, C)

    x = jax.lax.switch(i, [functools.partial(attend, j) for j in range(p)], x, q, kb, vb)
    ks.append(kb)
    vs.append(vb)
    if collect:
      feats.append(feat)
  last = jnp.asarray(np.asarray(chunks) - 1, jnp.int32)[i]
  logits = decoder.lm_logits(cfg, params, jax.lax.dynamic_index_in_dim(x, last, 1, keepdims=False))
  out = (logits[None], jnp.stack(ks)[None], jnp.stack(vs)[None])
  return out + ((jax.tree.map(lambda *f: jnp.stack(f)[None], *feats),) if collect else ())


def runahead_forward(cfg: ModelConfig, params: Params, tokens_BT, starts_B, *, mesh, chunks,
                     collect: str | None = None):
  """The chain over the mesh's seq axis. Returns (logits [B, V] of the last slot, k [L, B, K, T, H] and
  v (cache-ready: after key norm and RoPE), and with collect="kv" / "activation" per layer the pre-RoPE
  (K [B, T, K, H], V) or the normalised layer inputs (twice) [B, T, D], gathered from every device)."""
  B, T = tokens_BT.shape
  p = mesh.shape[AXIS]
  chunks = check_chunks(chunks, T, p)
  C = max(chunks)
  offs = np.concatenate([[0], np.cumsum(chunks)]).astype(int)
  blocks_pBC = jnp.stack([_pad_rows(tokens_BT[:, offs[j]:offs[j + 1]], C) for j in range(p)])
  blocks_pBC = jax.lax.with_sharding_constraint(blocks_pBC, NamedSharding(mesh, Pspec(AXIS)))
  fn = functools.partial(_chain, cfg, chunks=chunks, collect=collect)
  mapped = jax.shard_map(lambda t, prm, s: fn(prm, t[0], s), mesh=mesh, in_specs=(Pspec(AXIS), Pspec(), Pspec()),
                         out_specs=Pspec(AXIS), axis_names={AXIS})
  out = mapped(blocks_pBC, params, jnp.asarray(starts_B, jnp.int32))
  logits, k, v = out[0][-1], out[1][-1], out[2][-1]  # the last device holds the whole cache
  if not collect:
    return logits, k, v, None
  # [p, L, B, C, ...] per device -> per layer [B, T, ...]: each device's real rows, in chunk order.
  join = lambda f: jnp.concatenate([f[j, :, :, :chunks[j]] for j in range(p)], axis=2)
  a, b = (join(f) for f in out[3])
  return logits, k, v, tuple((a[l], b[l]) for l in range(a.shape[0]))


@functools.partial(jax.jit, static_argnames=("cfg", "max_len", "mesh", "chunks"))
def runahead_prefill(cfg: ModelConfig, params: Params, tokens_BT, starts_B, max_len: int, *, mesh, chunks):
  """decoder.prefill's result (logits [B, V] of the last prompt slot, a cache of max_len slots) by KV-Runahead."""
  T = tokens_BT.shape[1]
  if T > max_len:
    raise ValueError(f"prompt of {T} tokens does not fit a cache of max_len={max_len}; raise max_len")
  logits, k, v, _ = runahead_forward(cfg, params, tokens_BT, starts_B, mesh=mesh, chunks=chunks)
  pad = ((0, 0), (0, 0), (0, 0), (0, max_len - T), (0, 0))
  cache = KVCache(k=jnp.pad(k, pad), v=jnp.pad(v, pad), starts=jnp.asarray(starts_B, jnp.int32),
                  end=jnp.asarray(T, jnp.int32))
  return logits, cache


@functools.partial(jax.jit, static_argnames=("kcfg", "max_len", "mesh", "chunks"))
def kvp_runahead_prefill(kcfg: KVPConfig, base: Params, kp: inference.KVPParams, tokens_BT, starts_B,
                         max_len: int, *, mesh, chunks):
  """inference.kvp_prefill with the aux model's prefill of the first T-1 tokens run by KV-Runahead."""
  T = tokens_BT.shape[1]
  if T < 2:
    raise ValueError("KV Prediction needs prompts of at least 2 tokens (the aux reads all but the last)")
  if T > max_len:
    raise ValueError(f"prompt of {T} tokens does not fit a cache of max_len={max_len}; raise max_len")
  aux_tokens = tokens_BT[:, :-1]
  _, _, _, feats = runahead_forward(kcfg.aux, kp.aux, aux_tokens, starts_B, mesh=mesh, chunks=chunks,
                                    collect=kcfg.kind)
  if kcfg.kind == "kv":
    aux_out = decoder.ForwardOut(None, tuple(decoder.LayerKV(k, v) for k, v in feats), None)
  else:
    aux_out = decoder.ForwardOut(None, None, tuple(h for h, _ in feats))
  kv = predictor.predict(kcfg, kp.pred, aux_out)
  pos = inference.positions(aux_tokens, starts_B)
  c = inference.cache_from_layers(kcfg, base, kv, starts_B, pos, max_len)
  return decoder.forward(kcfg.base, base, tokens_BT[:, -1:], None, c, all_logits=False)


def runahead_method(cfg: ModelConfig, params: Params, mesh, chunks_for=None) -> ttft.Method:
  """The base's prefill by KV-Runahead over `mesh`'s seq axis, behind the TTFT-method interface.

  chunks_for: prompt length -> chunk lengths (default even); e.g. runahead_cost.balanced_chunks of a fitted
  cost model. FLOPs are the plain prefill's: KV-Runahead parallelises the same work, it does not remove any.
  """
  p = mesh.shape[AXIS]
  chunks_for = chunks_for or (lambda T: even_chunks(T, p))
  prefill = lambda tokens, starts, max_len: runahead_prefill(
      cfg, params, tokens, starts, max_len, mesh=mesh, chunks=tuple(chunks_for(tokens.shape[1])))
  return ttft.Method(name="runahead", aux=None, prefill=prefill, step=ttft.decoder_step(cfg, params),
                     ttft_flops=lambda n: float(flops.prefill_flops(cfg, n)),
                     ttft_flops_paper=lambda n: ttft.paper_flops(cfg, n), settings={"p": p})


def kvp_runahead_method(kcfg: KVPConfig, base: Params, kp: inference.KVPParams, aux: str, mesh,
                        chunks_for=None) -> ttft.Method:
  """KV Prediction whose aux prefill (what is left of its TTFT) runs by KV-Runahead over `mesh`'s seq axis.

  chunks_for: aux prompt length (T - 1) -> chunk lengths (default even). FLOPs are kvp_method's: the chain
  spreads the aux's work over p devices, it removes none of it.
  """
  p = mesh.shape[AXIS]
  chunks_for = chunks_for or (lambda n: even_chunks(n, p))
  plain = inference.kvp_method(kcfg, base, kp, aux)
  prefill = lambda tokens, starts, max_len: kvp_runahead_prefill(
      kcfg, base, kp, tokens, starts, max_len, mesh=mesh, chunks=tuple(chunks_for(tokens.shape[1] - 1)))
  return ttft.Method(name="kvp_runahead", aux=aux, prefill=prefill, step=plain.step, ttft_flops=plain.ttft_flops,
                     ttft_flops_paper=plain.ttft_flops_paper, settings={"p": p})

