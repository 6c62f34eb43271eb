"""Where KV Prediction's TTFT goes, piece by piece, for the benchmark's KVP-LP-0.25 and KVP-C at B=1.

  python launch/profile_kvp.py --prompt_len=1024

Times (medians of interleaved runs, order rotating) each prefix of `kvp.kvp_prefill`: the aux forward pass as
KVP runs it (XLA drops the last layer's unused output), + the predictor, + building the base cache (key norm,
RoPE, layout), the whole of kvp_prefill, and the base's last-token step alone. The differences are what each
piece costs; compare them with their FLOPs (kvp_jax/flops.py) to see which are memory-bound.

Memory roofline, in the same interleaved rounds: a jitted `x + 1` over a float32 array as large as the base's
weights (one read and one write of each byte) gives this machine's streaming bandwidth; the base's last-token
step must read every weight but the embedding table once, and the cache, so bytes read / its time is its
bandwidth. When the two are close, the step is bound by memory: no kernel work makes it faster at this batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kvp_jax import bench_lib, kvp, model, predictor
from kvp_jax import params as P
from kvp_jax.config import ModelConfig

flags.DEFINE_integer("prompt_len", 1024, "Prompt length T.")
flags.DEFINE_integer("runs", 7, "Timed runs per piece.")
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
  pairs = [bench_lib.lp_pairing(base_cfg, base, 0.25, jax.random.fold_in(key, 1)),
           bench_lib.c_pairing(base_cfg, ModelConfig(**C_AUX), jax.random.fold_in(key, 2))]
  T = F.prompt_len
  max_len = T + 1
  tokens = jax.random.randint(key, (1, T), 0, base_cfg.vocab_size)
  starts = jnp.zeros((1,), jnp.int32)
  prompt = tokens[:, :-1]
  calls = {}
  for pr in pairs:
    kc, kp = pr.kcfg, pr.kp
    pos = kvp.positions(prompt, starts)
    aux = jax.jit(lambda kp, t, kc=kc, pos=pos: model.forward_layers(
        kc.aux, kp.aux, t, pos, compute_logits=False, **predictor.collect_flags(kc.kind)).kv)
    pred = jax.jit(lambda kp, t, kc=kc, pos=pos: kvp.predict_layers(kc, kp, t, pos))
    cache = jax.jit(lambda kp, t, kc=kc: kvp.predict_cache(kc, base, kp, t, starts, max_len))
    full = jax.jit(lambda kp, t, kc=kc: kvp.kvp_prefill(kc, base, kp, t, starts, max_len))
    calls[f"{pr.name}: aux"] = lambda f=aux, kp=kp: f(kp, prompt)
    calls[f"{pr.name}: aux+predictor"] = lambda f=pred, kp=kp: f(kp, prompt)
    calls[f"{pr.name}: aux+predictor+cache"] = lambda f=cache, kp=kp: f(kp, prompt)
    calls[f"{pr.name}: kvp_prefill"] = lambda f=full, kp=kp: f(kp, tokens)
  c = kvp.predict_cache(pairs[0].kcfg, base, pairs[0].kp, prompt, starts, max_len)
  step = jax.jit(lambda b, t, c: model.forward(base_cfg, b, t, None, c, all_logits=False))
  calls["base: last-token step"] = lambda: step(base, tokens[:, -1:], c)
  weight_bytes = P.count(base) * 4
  stream = jnp.ones((weight_bytes // 4,), jnp.float32)
  add_one = jax.jit(lambda x: x + 1)
  calls["memory: x + 1 over weight bytes"] = lambda: add_one(stream)
  times = bench_lib.time_interleaved(calls, F.runs, 1)
  for k, v in times.items():
    print(f"{k:32s} {np.median(v) * 1e3:8.1f} ms")
  # Every weight but the embedding table (one row of it), and the whole cache, read once.
  step_bytes = (P.count(base) - base.embed.size) * 4 + (c.k.size + c.v.size) * 4
  stream_bw = 2 * weight_bytes / np.median(times["memory: x + 1 over weight bytes"])
  step_bw = step_bytes / np.median(times["base: last-token step"])
  print(f"streaming bandwidth (x + 1: read + write) {stream_bw / 1e9:6.1f} GB/s")
  print(f"base last-token step reads {step_bytes / 1e6:.0f} MB: {step_bw / 1e9:6.1f} GB/s "
        f"({step_bw / stream_bw:.2f} of streaming)")


if __name__ == "__main__":
  app.run(main)
