"""`python -m kvp_jax.bench --flagfile=configs/bench_cpu.flags --output=bench.json`

XLA-compiled latency (TTFT, TPOT), FLOPs, memory of the base's prefill, each aux model alone, KV Prediction,
KV Prediction + selective recomputation at a few budgets, the LazyLLM / random / static pruning baselines and
the rivals SwiftKV, SpecPrefill and GemFilter (kvp_jax/baselines/), against a float32 matmul roofline and
transformers' PyTorch prefill of the same weights; see kvp_jax/benchmark/runner.py for the protocol. Prints a
table, writes the JSON and a plot of TTFT against prompt length (<output>.png).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

flags.DEFINE_string("output", "bench.json", "Where the JSON goes; the plot goes beside it as .png.")
flags.DEFINE_list("prompt_lens", ["128", "512", "1024", "2048"], "Prompt lengths T.")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes B.")
flags.DEFINE_integer("max_tokens_per_batch", 4096, "Skip (T, B) with B * T above this (keeps the run short).")
flags.DEFINE_list("skip_groups", [], "(B, T) groups not to run, as BxT (e.g. 8x128), to keep the run short.")
flags.DEFINE_integer("runs", 5, "Timed runs per method (interleaved across methods).")
flags.DEFINE_integer("warmup", 1, "Untimed calls per method before the timed runs.")
flags.DEFINE_integer("tpot_steps", 20, "Timed decode steps per cache for TPOT.")
flags.DEFINE_integer("matmul_n", 2048, "Size of the float32 roofline matmul (n x n x n).")
flags.DEFINE_bool("torch", True, "Also time transformers' PyTorch prefill of the same base weights.")
flags.DEFINE_string("dtype", "float32", "Parameter dtype of the JAX models (the torch peer is float32).")
flags.DEFINE_integer("seed", 0, "Seed of random weights and tokens.")
flags.DEFINE_string("base_checkpoint", None, "Base weights: a pretrain workdir or HF directory; random if unset.")
flags.DEFINE_string("base_model", '{"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, '
                    '"num_layers": 12, "num_heads": 12, "num_kv_heads": 4, "head_dim": 64}',
                    "Random base: ModelConfig fields as JSON (ignored with --base_checkpoint).")
flags.DEFINE_list("lp_fractions", ["0.25", "0.5"], "KVP-LP pairings: keep fractions of the base's layers.")
flags.DEFINE_string("c_model", '{"hidden_size": 512, "intermediate_size": 1408, "num_layers": 6, '
                    '"num_heads": 8, "num_kv_heads": 4, "head_dim": 64}',
                    "KVP-C pairing: a narrower random aux, ModelConfig fields as JSON (vocab = the base's); '' for none.")
flags.DEFINE_list("kvp_workdir", [], "Trained aux + predictor pairings from kvp workdirs (--stage=kvp).")
flags.DEFINE_list("recompute_budgets", ["1x16", "2x16", "4x32"],
                  "kvp_recompute rows: num_intervals x interval_size per budget (recompute.py); empty for none.")
flags.DEFINE_string("recompute_aux", "", "The pairing kvp_recompute uses (e.g. lp0.5); '' = the first LP pairing.")
flags.DEFINE_float("recompute_edge_fraction", 0.1, "kvp_recompute: fraction of each prompt end always recomputed.")
flags.DEFINE_enum("recompute_importance", "column", ["column", "last_row"], "kvp_recompute: token importance.")
flags.DEFINE_string("lazyllm_schedule", "3:0.7,6:0.5,9:0.4",
                    "lazyllm row: layer:keep_fraction,... (layers in [1, base layers)); '' for none.")
flags.DEFINE_list("prune_keep", ["0.5"], "random_prune and static_prune rows: keep fractions; empty for none.")
flags.DEFINE_float("static_probe_fraction", 0.25, "static_prune: fraction of layers run on every token.")
flags.DEFINE_list("swiftkv_cutoffs", ["0.5"], "swiftkv rows: fraction of the base's layers every prompt token runs "
                  "(projections initialised from the base); empty for none.")
flags.DEFINE_list("specprefill_keep", ["0.3"], "specprefill rows: fraction of 32-token chunks kept; "
                  "empty for none.")
flags.DEFINE_string("specprefill_draft", "", "The pairing whose aux is SpecPrefill's draft; '' = the C pairing.")
flags.DEFINE_list("gemfilter_topk", ["256"], "gemfilter rows: tokens kept; empty for none.")
flags.DEFINE_integer("gemfilter_layer", None, "gemfilter: selection layer (default: 13 of 32 layers, scaled).")

FLAGS = flags.FLAGS


def _group(g: str) -> tuple[int, int]:
  b, _, t = g.lower().partition("x")
  if not (b.isdigit() and t.isdigit()):
    raise ValueError(f"--skip_groups entries are BATCHxPROMPT_LEN (e.g. 8x128), got {g!r}")
  return int(b), int(t)


def _build_spec():
  import jax
  import jax.numpy as jnp

  from kvp_jax.benchmark import methods as bm
  from kvp_jax.benchmark import runner as bench_runner
  from kvp_jax.kvp import checkpoints as kvp_checkpoints
  from kvp_jax.models import checkpoints
  from kvp_jax.models import params as P
  from kvp_jax.models.config import ModelConfig
  dtype = jnp.dtype(FLAGS.dtype)
  key = jax.random.PRNGKey(FLAGS.seed)
  if FLAGS.base_checkpoint:
    base_cfg, base = checkpoints.load_model(FLAGS.base_checkpoint, dtype)
  else:
    base_cfg = ModelConfig(**json.loads(FLAGS.base_model))
    base = P.init(base_cfg, key, dtype)
  pairings = []
  for i, f in enumerate(FLAGS.lp_fractions):
    pairings.append(bm.lp_pairing(base_cfg, base, float(f), jax.random.fold_in(key, 100 + i)))
  if FLAGS.c_model:
    aux_cfg = ModelConfig(**{"vocab_size": base_cfg.vocab_size, **json.loads(FLAGS.c_model)})
    pairings.append(bm.c_pairing(base_cfg, aux_cfg, jax.random.fold_in(key, 200), dtype))
  for wd in FLAGS.kvp_workdir:
    kcfg, _, kp = kvp_checkpoints.load_kvp(wd, base_params=base, dtype=dtype)
    if kcfg.base != base_cfg:
      raise ValueError(f"{wd} was trained for another base config than the one benchmarked")
    pairings.append(bm.Pairing(Path(wd).name, kcfg, kp))
  from kvp_jax.baselines import pruning
  budgets = []
  for b in FLAGS.recompute_budgets:
    ni, _, isz = b.lower().partition("x")
    if not isz:
      raise ValueError(f"--recompute_budgets entries are num_intervals x interval_size (e.g. 2x16), got {b!r}")
    budgets.append((int(ni), int(isz)))
  schedule = pruning.check_schedule(pruning.parse_schedule(FLAGS.lazyllm_schedule), base_cfg.num_layers)
  return bench_runner.BenchSpec(
      base_cfg=base_cfg, base=base, pairings=pairings, prompt_lens=[int(t) for t in FLAGS.prompt_lens],
      batch_sizes=[int(b) for b in FLAGS.batch_sizes], max_tokens_per_batch=FLAGS.max_tokens_per_batch,
      skip_groups=tuple(_group(g) for g in FLAGS.skip_groups),
      runs=FLAGS.runs, warmup=FLAGS.warmup, tpot_steps=FLAGS.tpot_steps, matmul_n=FLAGS.matmul_n,
      torch=FLAGS.torch, seed=FLAGS.seed, log=lambda s: print(s, flush=True),
      recompute_budgets=tuple(budgets), recompute_pairing=FLAGS.recompute_aux or None,
      recompute_edge_fraction=FLAGS.recompute_edge_fraction, recompute_importance=FLAGS.recompute_importance,
      lazyllm_schedule=schedule, prune_keep=tuple(float(k) for k in FLAGS.prune_keep),
      static_probe_fraction=FLAGS.static_probe_fraction,
      swiftkv_cutoffs=tuple(float(c) for c in FLAGS.swiftkv_cutoffs),
      specprefill_keep=tuple(float(k) for k in FLAGS.specprefill_keep),
      specprefill_draft=FLAGS.specprefill_draft or None, gemfilter_topk=tuple(int(k) for k in FLAGS.gemfilter_topk),
      gemfilter_layer=FLAGS.gemfilter_layer)


def main(argv):
  del argv
  from kvp_jax.benchmark import report as bench_report
  from kvp_jax.benchmark import runner as bench_runner
  from kvp_jax.models.hf_checkpoint import CheckpointError
  try:
    spec = _build_spec()
  except (ValueError, CheckpointError, FileNotFoundError) as e:  # bad flags or checkpoints: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  result = bench_runner.run(spec)
  out = Path(FLAGS.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=1))
  print(bench_report.table(result))
  png = out.with_suffix(".png")
  print(f"wrote {out}" + (f" and {png}" if bench_report.plot(result, png) else " (no matplotlib: no plot)"))


if __name__ == "__main__":
  app.run(main)
