"""Where the decode step's time goes at batch 1 and 8: its weight matmuls alone against the whole step.

  python launch/profile_decode.py [--prompt_len=512] [--batches=1,8] [--runs=15]

On the benchmark's random 125M base (configs/bench_cpu.flags), times in interleaved rounds (order rotating):
- `step`: `decoder.decode_step` from a cache holding prompt_len tokens (the cache it returns feeds the next call,
  as in generation);
- `matmuls`: the same step's weight products only, [B, D] rows through every layer's q/k/v/o and MLP projections
  and the LM head, compiled with the same XLA options (decode_options(B)) and no cache, attention, norms or RoPE;
- with --parts, the same step with its attention over the cache replaced by: nothing (the layer's own value passes
  through; the cache is still written), the score product and softmax only, or the value product only (with
  uniform weights); so the step's excess splits between the score and the value products;
- with --parts, the attention products alone on the same shapes (12 layers of [B*K, G, H] x [B*K, S, H] scores
  and [B*K, G, S] x [B*K, S, H] values) in XLA with its own dot emitter, in XLA with YNNPACK's, and in PyTorch
  (`torch.bmm`, if installed: a reference only), against reading those K/V bytes once;
- the read probe and the 2048^3 matmul of the benchmark's roofline.
Prints each median, the bytes-read bound of the matmuls (every weight once at the probe's bandwidth) and their
FLOPs at the matmul peak, so the step's excess over its roofline splits into matmuls vs the rest.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kvp_jax.benchmark import timing
from kvp_jax.models import attention, compile_options, decoder
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig

flags.DEFINE_integer("prompt_len", 512, "Tokens already in the cache.")
flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
flags.DEFINE_integer("runs", 15, "Timed rounds.")
flags.DEFINE_bool("parts", False, "Also time the step without attention, with scores only, with values only, and the "
                  "attention products alone in XLA (both dot paths) and torch.")
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


def _scores(q_BTNH, k_BKSH, mask_BTS):
  """Softmax weights [B, K, G, S] of the step's query (T=1) over the cache."""
  B, _, N, H = q_BTNH.shape
  K = k_BKSH.shape[1]
  q = (q_BTNH.astype(jnp.float32) * H ** -0.5).reshape(B, K, N // K, H)
  s = jnp.einsum("BKGH,BKSH->BKGS", q, k_BKSH) + attention.mask_bias(mask_BTS)[:, :, :, 0]
  p = jnp.exp(s - jnp.max(s, -1, keepdims=True))
  return p / jnp.sum(p, -1, keepdims=True)


# What replaces attention over the cache in the ablated steps (T=1); each output is [B, 1, N, H].
PARTS = {
    "no attention": lambda q, k, v, m: q,
    "scores only": lambda q, k, v, m: q * _scores(q, k, m).sum(-1).reshape(q.shape[0], 1, -1, 1),
    "values only": lambda q, k, v, m: jnp.einsum(
        "BKGS,BKSH->BKGH", jnp.broadcast_to(q[..., :1].reshape(q.shape[0], k.shape[1], -1, 1),
                                            (q.shape[0], k.shape[1], q.shape[2] // k.shape[1], k.shape[2])),
        v).reshape(q.shape),
}


def ablated_step(cfg: ModelConfig, part: str, B: int):
  """`decoder.decode_step` (same layers, cache writes and XLA options) with attention replaced by PARTS[part]."""
  def step(params, tokens_B1, cache):
    pos = cache.end - cache.starts[:, None]
    mask = attention.causal_mask(pos, cache.slot_positions()) & (jnp.arange(cache.max_len)[None, None] <= cache.end)
    attend = lambda i, q, k, v, c: PARTS[part](q, c.k[i], c.v[i], mask)
    x, cache = decoder._cached_layers(cfg, params, tokens_B1, pos, cache, cache.end, attend)
    return decoder.lm_logits(cfg, params, x[:, -1]), cache.replace(end=cache.end + 1)
  return jax.jit(step, compiler_options=compile_options.decode_options(B), donate_argnums=2)


def products_alone(cfg: ModelConfig, B: int, S: int) -> dict:
  """{name: call} of the attention products of one step on their own: XLA (its dot emitter, YNNPACK's), torch."""
  K, G, H, L = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
  rng = np.random.default_rng(0)
  ks = [rng.standard_normal((B * K, S, H), dtype=np.float32) for _ in range(L)]
  vs = [rng.standard_normal((B * K, S, H), dtype=np.float32) for _ in range(L)]
  q0 = rng.standard_normal((B * K, G, H), dtype=np.float32)

  def xla(q, ks, vs):
    for k, v in zip(ks, vs):  # each layer's query depends on the last's output, as in the step
      q = q + jnp.einsum("bgs,bsh->bgh", jax.nn.softmax(jnp.einsum("bgh,bsh->bgs", q, k), -1), v)
    return q
  calls = {}
  jk, jv, jq = [jnp.asarray(k) for k in ks], [jnp.asarray(v) for v in vs], jnp.asarray(q0)
  for name, opts in (("XLA dots", compile_options.decode_options(compile_options.NO_YNN_MIN_BATCH)),
                     ("YNNPACK dots", compile_options.CACHE_WRITE)):
    f = jax.jit(xla, compiler_options=opts)
    calls[f"B={B} products alone, {name}"] = lambda f=f: f(jq, jk, jv)
  try:
    import torch  # a reference only, never a dependency of kvp_jax
  except ImportError:
    return calls
  tk = [torch.from_numpy(k).transpose(1, 2) for k in ks]
  tv, tq = [torch.from_numpy(v) for v in vs], torch.from_numpy(q0)

  def torch_products():
    q = tq
    with torch.inference_mode():
      for k, v in zip(tk, tv):
        q = q + torch.bmm(torch.bmm(q, k).softmax(-1), v)
    return jnp.zeros(())
  calls[f"B={B} products alone, torch.bmm"] = torch_products
  return calls


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
    if F.parts:
      for part in PARTS:
        st = {"cache": jax.tree.map(jnp.copy, cache)}
        f = ablated_step(cfg, part, B)

        def ablated(f=f, st=st, tok=tokens[:, -1:]):
          logits, st["cache"] = f(params, tok, st["cache"])
          return logits
        calls[f"B={B} step, {part}"] = ablated
      calls.update(products_alone(cfg, B, cache.max_len))
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
    if F.parts:
      none = med[f"B={B} step, no attention"]
      print(f"  B={B} step without attention {none * 1e3:.1f} ms; attention adds {(s - none) * 1e3:.1f} ms: scores and "
            f"softmax alone {(med[f'B={B} step, scores only'] - none) * 1e3:.1f} ms, the value product alone "
            f"{(med[f'B={B} step, values only'] - none) * 1e3:.1f} ms")
      alone = {k.split(", ", 1)[1]: v for k, v in med.items() if k.startswith(f"B={B} products alone")}
      print(f"  B={B} attention products alone (one K and one V read: {cache_bytes[B] / bw * 1e3:.1f} ms): " +
            ", ".join(f"{k.removeprefix('products alone, ')} {v * 1e3:.1f} ms" for k, v in alone.items()))


if __name__ == "__main__":
  app.run(main)
