"""Where KV Prediction's TTFT goes, piece by piece, for the benchmark's KVP-LP-0.25 and KVP-C.

  python launch/profile_kvp.py --prompt_len=1024 [--batch=8]

Times (medians of interleaved runs, order rotating) each prefix of `inference.kvp_prefill`: the aux forward pass as
KVP runs it (XLA drops the last layer's unused output), + the predictor, + building the base cache (key norm,
RoPE, layout), the whole of kvp_prefill, and the base's last-token step alone. The differences are what each
piece costs; compare them with their FLOPs (kvp_jax/models/flops.py) to see which are memory-bound. The cache
build has no FLOPs to speak of: its floor is reading the predictions and writing the cache once, at the
measured bandwidth (printed beside it).

Memory roofline, in the same interleaved rounds: a jitted sum over a float32 array as large as the bytes the
base's last-token step reads (every weight but the embedding table, and the cache) gives this machine's read
bandwidth; bytes read / the step's time is the step's. When the two are close, the step is bound by memory:
no kernel work makes it faster at this batch size. (A read-only sum: an `x + 1` would also write, and
allocate, a fresh array as large, and measure page faults more than bandwidth.)
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kvp_jax.benchmark import methods as bm
from kvp_jax.benchmark import timing
from kvp_jax.kvp import inference, predictor
from kvp_jax.kvp.flops import aux_prediction_flops, kvp_flops, predictor_flops
from kvp_jax.models import decoder, flops
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig

flags.DEFINE_integer("prompt_len", 1024, "Prompt length T.")
flags.DEFINE_integer("runs", 7, "Timed runs per piece.")
flags.DEFINE_integer("batch", 1, "Batch size B.")
F = flags.FLAGS
BASE = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_layers": 12, "num_heads": 12,
        "num_kv_heads": 4, "head_dim": 64}  # configs/bench_cpu.flags
C_AUX = {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1408, "num_layers": 6, "num_heads": 8,
         "num_kv_heads": 4, "head_dim": 64}


def main(argv):
  del argv
  base_cfg = ModelConfig(**BASE)
  key = jax.random.PRNGKey(0)
  base = P.init(base_cfg, key)
  pairs = [bm.lp_pairing(base_cfg, base, 0.25, jax.random.fold_in(key, 1)),
           bm.c_pairing(base_cfg, ModelConfig(**C_AUX), jax.random.fold_in(key, 2))]
  T = F.prompt_len
  max_len = T + 1
  B = F.batch
  tokens = jax.random.randint(key, (B, T), 0, base_cfg.vocab_size)
  starts = jnp.zeros((B,), jnp.int32)
  prompt = tokens[:, :-1]
  calls = {}
  for pr in pairs:
    kc, kp = pr.kcfg, pr.kp
    pos = inference.positions(prompt, starts)
    aux = jax.jit(lambda kp, t, kc=kc, pos=pos: decoder.forward_layers(
        kc.aux, kp.aux, t, pos, compute_logits=False, **predictor.collect_flags(kc.kind)).kv)
    pred = jax.jit(lambda kp, t, kc=kc, pos=pos: inference.predict_layers(kc, kp, t, pos))
    cache = jax.jit(lambda kp, t, kc=kc: inference.predict_cache(kc, base, kp, t, starts, max_len))
    # kvp_prefill is jitted itself, with its own compiler options (which a surrounding jit may not carry).
    full = lambda kp, t, kc=kc: inference.kvp_prefill(kc, base, kp, t, starts, max_len)
    calls[f"{pr.name}: aux"] = lambda f=aux, kp=kp: f(kp, prompt)
    calls[f"{pr.name}: aux+predictor"] = lambda f=pred, kp=kp: f(kp, prompt)
    calls[f"{pr.name}: aux+predictor+cache"] = lambda f=cache, kp=kp: f(kp, prompt)
    calls[f"{pr.name}: kvp_prefill"] = lambda f=full, kp=kp: f(kp, tokens)
  c = inference.predict_cache(pairs[0].kcfg, base, pairs[0].kp, prompt, starts, max_len)
  step = jax.jit(lambda b, t, c: decoder.forward(base_cfg, b, t, None, c, all_logits=False))
  calls["base: last-token step"] = lambda: step(base, tokens[:, -1:], c)
  # Every weight but the embedding table (one row of it), and the whole cache, read once.
  step_bytes = (P.count(base) - base.embed.size) * 4 + (c.k.size + c.v.size) * 4
  stream = jnp.ones((step_bytes // 4,), jnp.float32)
  read_all = jax.jit(jnp.sum)
  calls["memory: sum over as many bytes"] = lambda: read_all(stream)
  mm, mm_flops, _ = timing.matmul_call(2048)
  calls["matmul 2048^3"] = mm
  prefill = jax.jit(lambda b, t: decoder.prefill(base_cfg, b, t, starts, max_len)[0])
  calls["base: prefill"] = lambda: prefill(base, tokens)
  times = timing.time_interleaved(calls, F.runs, 1)
  med = {k: float(np.median(v)) for k, v in times.items()}
  for k, v in med.items():
    print(f"{k:32s} {v * 1e3:8.1f} ms")
  peak = mm_flops / med["matmul 2048^3"]
  print(f"\nmatmul peak {peak / 1e9:.0f} GFLOP/s. Each piece (a difference of the prefixes above), its FLOPs, and "
        "its time over the time those FLOPs take at the peak:")
  pieces = [("base: prefill", med["base: prefill"], flops.prefill_flops(base_cfg, T, batch=B))]
  for pr in pairs:
    kc, n = pr.kcfg, f"{pr.name}: "
    aux_f = aux_prediction_flops(kc.aux, T - 1, kind=kc.kind, batch=B)
    pred_f = predictor_flops(base_cfg, kc.in_width, T - 1, batch=B)
    pieces += [(n + "aux", med[n + "aux"], aux_f),
               (n + "predictor", med[n + "aux+predictor"] - med[n + "aux"], pred_f),
               (n + "cache build", med[n + "aux+predictor+cache"] - med[n + "aux+predictor"], 0),
               (n + "base step (in kvp)", med[n + "kvp_prefill"] - med[n + "aux+predictor+cache"],
                flops.decode_flops(base_cfg, T - 1, batch=B)),
               (n + "kvp_prefill", med[n + "kvp_prefill"],
                kvp_flops(base_cfg, kc.aux, T, in_width=kc.in_width, kind=kc.kind, batch=B))]
  for name, t, f in pieces:
    print(f"  {name:28s} {t * 1e3:8.1f} ms {f / 1e9:8.2f} GFLOP  x{t / (f / peak) if f else float('inf'):6.2f}")
  read_bw = step_bytes / med["memory: sum over as many bytes"]
  # The cache build's floor: it must read the predicted K/V ([L, B, T-1, K, H] twice) and write the cache
  # ([L, B, K, max_len, H] twice) once each, whatever is fused into what.
  pred_bytes = 2 * base_cfg.num_layers * B * (T - 1) * base_cfg.kv_width * 4
  cache_bytes = (c.k.size + c.v.size) * 4
  for pr in pairs:
    n = f"{pr.name}: "
    t = med[n + "aux+predictor+cache"] - med[n + "aux+predictor"]
    floor = (pred_bytes + cache_bytes) / read_bw
    print(f"{n}cache build {t * 1e3:.1f} ms: reads {pred_bytes / 1e6:.0f} MB of predictions and writes a "
          f"{cache_bytes / 1e6:.0f} MB cache, {floor * 1e3:.1f} ms at the read bandwidth: x{t / floor:.2f} its floor")
  step_bw = step_bytes / med["base: last-token step"]
  print(f"read bandwidth (sum over {step_bytes / 1e6:.0f} MB) {read_bw / 1e9:6.1f} GB/s")
  print(f"base last-token step reads {step_bytes / 1e6:.0f} MB: {step_bw / 1e9:6.1f} GB/s "
        f"({step_bw / read_bw:.2f} of the read bandwidth)")


if __name__ == "__main__":
  app.run(main)
