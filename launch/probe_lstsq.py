"""Is KV Prediction's linear predictor short of data or of capacity? Held-out R^2 of the least-squares fit.

On SmolLM2-135M-Instruct (the bundled GGUF) with a KVP-LP aux, fits the predictor (kvp/lstsq.py) on growing
numbers of tokens of the smollm2 preset's chat-format training mix and reports, for each predictor kind, the
share of the base's pre-RoPE K and V variance it explains on the fitting tokens and on held-out tokens (mean
over base layers, and the worst layer). If held-out R^2 rises with tokens, the quickstart's 4096-token fit was
short of data; if it is flat and close to the fitting R^2, the linear map itself is the limit and only
training the aux (the paper's 70k joint steps) can move it.

  python launch/probe_lstsq.py --lp_keep_fraction=0.5 --kinds=kv,activation --tokens=4096,16384,32768

Prints one line per (kind, tokens) and writes them as JSON lines to --output.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from kvp_jax.data import pipeline
from kvp_jax.kvp import aux_models, inference, lstsq
from kvp_jax.models import checkpoints, pretrained, zoo
from kvp_jax.quickstart import _SMOLLM2_DATA
from kvp_jax.training import stages

F = flags.FLAGS
flags.DEFINE_float("lp_keep_fraction", 0.5, "Fraction of the base's layers the KVP-LP aux keeps.")
flags.DEFINE_list("kinds", ["kv", "activation"], "Predictor kinds: kv (aux K/V in) and activation (aux hidden in).")
flags.DEFINE_list("tokens", ["4096", "16384", "32768"], "Fitting token counts to report at.")
flags.DEFINE_integer("heldout_tokens", 4096, "Held-out tokens (read first, never fitted on).")
flags.DEFINE_float("ridge", 1e-3, "Relative ridge, as --lstsq_ridge.")
flags.DEFINE_string("output", "/tmp/probe_lstsq.jsonl", "JSON lines, one per (kind, tokens).")


def heldout_r2(m: lstsq.Moments, part: str, ws: list[np.ndarray], layer_map) -> np.ndarray:
  """R^2 per base layer of fixed maps ws[i] ([I+1, O], bias last) on the tokens summed in m."""
  used = sorted(set(layer_map))
  xtx, xty, yy = getattr(m, f"xtx_{part}"), getattr(m, f"xty_{part}"), getattr(m, f"yy_{part}")
  out = []
  for i, j in enumerate(layer_map):
    g, w = xtx[used.index(j)], ws[i]
    sse = yy[i] - 2 * np.sum(w * xty[i]) + np.sum(w * (g @ w))
    mean = xty[i][-1] / m.count
    out.append(1.0 - sse / (yy[i] - m.count * np.sum(mean ** 2)))
  return np.asarray(out)


def main(argv):
  del argv
  base_dir = pretrained.cached_conversion(zoo.smollm2())
  base_cfg, base = checkpoints.load_model(str(base_dir))
  tok = stages.get_tokenizer(str(base_dir), None, None)
  dc = stages.DataConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in _SMOLLM2_DATA.items()})
  texts = stages.texts_for(dc, tok)
  counts = sorted(int(t) for t in F.tokens)
  out = Path(F.output)
  out.write_text("")
  for kind in F.kinds:
    kcfg, kp = inference.build(base_cfg, base, aux_models.AuxSpec(kind="lp", lp_keep_fraction=F.lp_keep_fraction),
                               kind=kind)
    # The same stream for every kind: held-out tokens first, then the fitting tokens.
    it = pipeline.make_lm_iterator(texts, tok, dc.seq_len, dc.batch_size, dc.seed + 7919, packing="concat",
                                   add_bos=dc.add_bos)
    hold, fit = lstsq.Moments.zeros(kcfg), lstsq.Moments.zeros(kcfg)
    t0 = time.time()
    for b in it:
      tokens = jax.numpy.asarray(b["inputs"], jax.numpy.int32)
      m = jax.device_get(lstsq.chunk_moments(kcfg, base, kp.aux, tokens, jax.numpy.ones(tokens.shape, bool)))
      if hold.count < F.heldout_tokens:
        hold.add(m)
        continue
      fit.add(m)
      if counts and fit.count >= counts[0]:
        counts.pop(0)
        wk, bk, wv, bv, r2k, r2v = lstsq.solve(fit, kcfg.layer_map, F.ridge)
        wsk = [np.concatenate([w, b[None]], 0).astype(np.float64) for w, b in zip(wk, bk)]
        wsv = [np.concatenate([w, b[None]], 0).astype(np.float64) for w, b in zip(wv, bv)]
        hk, hv = heldout_r2(hold, "k", wsk, kcfg.layer_map), heldout_r2(hold, "v", wsv, kcfg.layer_map)
        row = {"kind": kind, "lp_keep_fraction": F.lp_keep_fraction, "fit_tokens": int(fit.count),
               "heldout_tokens": int(hold.count), "in_width": kcfg.in_width, "out_width": kcfg.out_width,
               "fit_r2_k_mean": float(np.mean(r2k)), "fit_r2_v_mean": float(np.mean(r2v)),
               "heldout_r2_k_mean": float(np.mean(hk)), "heldout_r2_v_mean": float(np.mean(hv)),
               "heldout_r2_k_min": float(np.min(hk)), "heldout_r2_v_min": float(np.min(hv)),
               "heldout_r2_k": hk.tolist(), "heldout_r2_v": hv.tolist(), "seconds": time.time() - t0}
        print(f"{kind:10s} in {kcfg.in_width:4d} fit {row['fit_tokens']:6d} tokens: R^2 K fit {row['fit_r2_k_mean']:.3f}"
              f" held-out {row['heldout_r2_k_mean']:.3f} (worst {row['heldout_r2_k_min']:.3f}) | V fit "
              f"{row['fit_r2_v_mean']:.3f} held-out {row['heldout_r2_v_mean']:.3f} (worst "
              f"{row['heldout_r2_v_min']:.3f}) | {row['seconds']:.0f}s", flush=True)
        with out.open("a") as f:
          f.write(json.dumps(row) + "\n")
      if not counts:
        break
    counts = sorted(int(t) for t in F.tokens)


if __name__ == "__main__":
  app.run(main)
