"""Where the decode step's time goes at batch 1 and 8: its weight matmuls alone against the whole step.

  python launch/profile_decode.py [--prompt_len=512] [--batches=1,8] [--runs=15]

On the benchmark's random 125M base (configs/bench_cpu.flags), times in interleaved rounds (order rotating):
- `step`: `decoder.decode_step` from a cache holding prompt_len tokens (the cache it returns feeds the next call,
  as in generation);
- `matmuls`: the same step's weight products only, [B, D] rows through every layer's q/k/v/o and MLP projections
  and the LM head, compiled with the same XLA options (decode_options(B)) and no cache, attention, norms or RoPE;
- the read probe and the 2048^3 matmul of the benchmark's roofline.
Prints each median, the bytes-read bound of the matmuls (every weight once at the probe's bandwidth) and their
FLOPs at the matmul peak, so the step's excess over its roofline splits into matmuls vs the rest.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kvp_jax.benchmark import timing
from kvp_jax.models import compile_options, decoder
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig

flags.DEFINE_integer("prompt_len", 512, "Tokens already in the cache.")
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
flags.DEFINE_integer("runs", 15, "Timed rounds.")
F = flags.FLAGS

BASE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12, num_kv_heads=4,
            head_dim=64)


def matmuls_only(cfg: ModelConfig, p: P.Params, x_BD):
  """The decode step's weight products on [B, D] rows, kept dependent so none is dropped or reordered away."""
  D = cfg.hidden_size
  for lp in p.layers:
    q = x_BD @ lp.wq.reshape(D, -1)
    k = x_BD @ lp.wk.reshape(D, -1)
    v = x_BD @ lp.wv.reshape(D, -1)
    o = q @ lp.wo.reshape(-1, D)
    h = jax.nn.silu(x_BD @ lp.w_gate) * (x_BD @ lp.w_up)
    x_BD = x_BD + o + h @ lp.w_down + 1e-6 * (k.sum(-1, keepdims=True) + v.sum(-1, keepdims=True))
  head = p.lm_head if p.lm_head is not None else p.embed.T
  return x_BD @ head


def main(argv):
  del argv
  cfg = ModelConfig(**BASE)
  params = P.init(cfg, jax.random.PRNGKey(0))
  weight_bytes = (P.count(params) - params.embed.size + (params.embed.size if params.lm_head is None else 0)) * 4
  mm, mm_flops, _ = timing.matmul_call(2048)
  rb, rb_bytes = timing.read_bandwidth_call(256 << 20)
  calls, flops_of, cache_bytes = {"matmul 2048^3": mm, "read probe": rb}, {}, {}
  T = F.prompt_len
  for B in (int(b) for b in F.batches):
    tokens = jax.random.randint(jax.random.PRNGKey(B), (B, T), 0, cfg.vocab_size)
    _, cache = decoder.prefill(cfg, params, tokens, jnp.zeros((B,), jnp.int32), T + 4 * F.runs + 8)
    state = {"cache": cache, "tok": tokens[:, -1:]}

    def step(state=state):
      logits, state["cache"] = decoder.decode_step(cfg, params, state["tok"], state["cache"])
      return logits

    mmf = jax.jit(lambda p, x: matmuls_only(cfg, p, x), compiler_options=compile_options.decode_options(B))
    x = jax.random.normal(jax.random.PRNGKey(3), (B, cfg.hidden_size))
    calls[f"B={B} step"] = step
    calls[f"B={B} matmuls"] = lambda f=mmf, x=x: f(params, x)
    flops_of[B] = 2 * B * weight_bytes // 4
    cache_bytes[B] = (cache.k.size + cache.v.size) * 4
  times = timing.time_interleaved(calls, F.runs, 2)
  med = {k: float(np.median(v)) for k, v in times.items()}
  peak, bw = mm_flops / med["matmul 2048^3"], rb_bytes / med["read probe"]
  print(f"{timing.cpu_model()}: matmul peak {peak / 1e9:.1f} GFLOP/s, read bandwidth {bw / 1e9:.1f} GB/s; "
        f"weights read per step {weight_bytes / 1e6:.0f} MB")
  for B, fl in flops_of.items():
    read_s, flop_s = weight_bytes / bw, fl / peak
    s, m = med[f"B={B} step"], med[f"B={B} matmuls"]
    print(f"B={B}: step {s * 1e3:.1f} ms | matmuls alone {m * 1e3:.1f} ms ({m / s:.0%} of the step) | "
          f"their bounds: read {read_s * 1e3:.1f} ms, FLOPs {flop_s * 1e3:.1f} ms, sum {(read_s + flop_s) * 1e3:.1f} "
          f"ms | matmuls / sum of bounds {m / (read_s + flop_s):.2f} | rest of the step (attention over the cache, its "
          f"write, norms, RoPE) {(s - m) * 1e3:.1f} ms against a cache-read bound of {cache_bytes[B] / bw * 1e3:.1f} ms")


if __name__ == "__main__":
  app.run(main)
