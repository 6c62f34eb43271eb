"""`python -m kvp_jax.bench --flagfile=configs/bench_cpu.flags --output=bench.json`

XLA-compiled latency (TTFT, TPOT), FLOPs, memory of the base's prefill, each aux model alone, KV Prediction,
KV Prediction + selective recomputation at a few budgets, the LazyLLM / random / static pruning baselines and
the rivals SwiftKV, SpecPrefill and GemFilter (kvp_jax/baselines/), against a roofline (matmul peak and read
bandwidth measured in the same run), transformers' PyTorch prefill and decode of the same weights, and llama.cpp
on the base's original GGUF (when llama-cpp-python is installed); see kvp_jax/benchmark/runner.py for the
protocol. Prints a table, writes the JSON and a plot of TTFT against prompt length (<output>.png). An
interrupted run resumes from the (B, T) groups it finished (<output>.partial.jsonl).
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags

from kvp_jax import cli

flags.DEFINE_string("output", "bench.json", "Where the JSON goes; the plot goes beside it as .png.")
flags.DEFINE_list("prompt_lens", ["128", "512", "1024", "2048"], "Prompt lengths T.")
flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes B.")
flags.DEFINE_integer("max_tokens_per_batch", 4096, "Skip (T, B) with B * T above this (keeps the run short).")
flags.DEFINE_list("skip_groups", [], "(B, T) groups not to run, as BxT (e.g. 8x128), to keep the run short.")
flags.DEFINE_integer("runs", 5, "Timed runs per method (interleaved across methods).")
flags.DEFINE_integer("warmup", 1, "Untimed calls per method before the timed runs.")
flags.DEFINE_integer("tpot_steps", 20, "Timed decode steps per cache for TPOT.")
flags.DEFINE_integer("matmul_n", 2048, "Size of the float32 roofline matmul (n x n x n).")
flags.DEFINE_bool("torch", True, "Also time transformers' PyTorch prefill and decode of the same base weights.")
flags.DEFINE_bool("onnxruntime", False, "Also time ONNX Runtime's prefill of transformers' model exported to "
                  "ONNX (needs --torch and the onnxruntime, onnx, onnxscript packages; the export takes ~1 minute).")
flags.DEFINE_integer("read_probe_mb", 256, "Size of the read-bandwidth probe of the roofline, in MiB.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                  "Parameter dtype of the JAX models (the torch peer is float32).")
flags.DEFINE_integer("seed", 0, "Seed of random weights and tokens.")
flags.DEFINE_string("base_checkpoint", None,
                    "Base weights: a pretrain workdir, HF directory, .gguf file, or 'smollm2' (the bundled "
                    "SmolLM2-135M-Instruct GGUF); random if unset. A GGUF base is also timed in llama.cpp.")
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
# Refused while the command line is parsed (one line each, see kvp_jax/cli.py).
cli.ints("prompt_lens", 2)  # KV Prediction needs 2 tokens: the aux reads all but the last
cli.ints("batch_sizes", 1)
for _name in ("max_tokens_per_batch", "runs", "tpot_steps", "matmul_n"):
  cli.at_least(_name, 1)
cli.at_least("warmup", 0)
cli.floats_in("lp_fractions", 0.0, 1.0)
cli.floats_in("prune_keep", 0.0, 1.0)
cli.fraction("static_probe_fraction")
cli.floats_in("swiftkv_cutoffs", 0.0, 1.0)
cli.floats_in("specprefill_keep", 0.0, 1.0)
cli.ints("gemfilter_topk", 1)
cli.at_least("gemfilter_layer", 0)
flags.register_validator("recompute_edge_fraction", lambda v: 0 <= v < 0.5, message="must be in [0, 0.5)")


def _json(name: str) -> dict:
  try:
    v = json.loads(getattr(FLAGS, name))
  except json.JSONDecodeError as e:
    raise ValueError(f"--{name} is not valid JSON ({e.msg}); example: --{name}='{{\"hidden_size\": 128}}'") from None
  if not isinstance(v, dict):
    raise ValueError(f"--{name} must be a JSON object of ModelConfig fields, got {v!r}")
  return v


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
  # Flags first, so that a bad one fails before any weights are built or loaded.
  skip_groups = tuple(_group(g) for g in FLAGS.skip_groups)
  budgets = []
  for b in FLAGS.recompute_budgets:
    ni, _, isz = b.lower().partition("x")
    if not (ni.isdigit() and isz.isdigit()):
      raise ValueError(f"--recompute_budgets entries are num_intervals x interval_size (e.g. 2x16), got {b!r}")
    budgets.append((int(ni), int(isz)))
  dtype = jnp.dtype(FLAGS.dtype)
  key = jax.random.PRNGKey(FLAGS.seed)
  gguf = hf_dir = None
  if FLAGS.base_checkpoint:
    from kvp_jax.models import gguf_checkpoint, pretrained, zoo
    path = zoo.smollm2() if FLAGS.base_checkpoint == "smollm2" else FLAGS.base_checkpoint
    gguf = gguf_checkpoint.find_gguf(path)
    if gguf is not None:  # converted once to safetensors (fast to load), which the torch peer reads too
      hf_dir = str(pretrained.cached_conversion(gguf))
    base_cfg, base = checkpoints.load_model(hf_dir or path, dtype)
  else:
    base_cfg = ModelConfig.from_dict(_json("base_model"))
    base = P.init(base_cfg, key, dtype)
  pairings = []
  for i, f in enumerate(FLAGS.lp_fractions):
    pairings.append(bm.lp_pairing(base_cfg, base, float(f), jax.random.fold_in(key, 100 + i)))
  if FLAGS.c_model:
    aux_cfg = ModelConfig.from_dict({"vocab_size": base_cfg.vocab_size, **_json("c_model")})
    pairings.append(bm.c_pairing(base_cfg, aux_cfg, jax.random.fold_in(key, 200), dtype))
  for wd in FLAGS.kvp_workdir:
    kcfg, _, kp = kvp_checkpoints.load_kvp(wd, base_params=base, dtype=dtype)
    if kcfg.base != base_cfg:
      raise ValueError(f"{wd} was trained for another base config than the one benchmarked")
    pairings.append(bm.Pairing(Path(wd).name, kcfg, kp))
  from kvp_jax.baselines import pruning
  schedule = pruning.check_schedule(pruning.parse_schedule(FLAGS.lazyllm_schedule), base_cfg.num_layers)
  if FLAGS["specprefill_keep"].present and FLAGS.specprefill_keep and not pairings:
    raise ValueError("--specprefill_keep needs a draft model: give a pairing (--lp_fractions, --c_model or "
                     "--kvp_workdir) or drop --specprefill_keep")
  spec = bench_runner.BenchSpec(
      base_cfg=base_cfg, base=base, pairings=pairings, prompt_lens=[int(t) for t in FLAGS.prompt_lens],
      batch_sizes=[int(b) for b in FLAGS.batch_sizes], max_tokens_per_batch=FLAGS.max_tokens_per_batch,
      skip_groups=skip_groups,
      runs=FLAGS.runs, warmup=FLAGS.warmup, tpot_steps=FLAGS.tpot_steps, matmul_n=FLAGS.matmul_n,
      torch=FLAGS.torch, onnxruntime=FLAGS.onnxruntime, seed=FLAGS.seed, log=lambda s: print(s, flush=True),
      recompute_budgets=tuple(budgets), recompute_pairing=FLAGS.recompute_aux or None,
      recompute_edge_fraction=FLAGS.recompute_edge_fraction, recompute_importance=FLAGS.recompute_importance,
      lazyllm_schedule=schedule, prune_keep=tuple(float(k) for k in FLAGS.prune_keep),
      static_probe_fraction=FLAGS.static_probe_fraction, read_probe_mb=FLAGS.read_probe_mb,
      gguf=str(gguf) if gguf else None, hf_dir=hf_dir,
      swiftkv_cutoffs=tuple(float(c) for c in FLAGS.swiftkv_cutoffs),
      specprefill_keep=tuple(float(k) for k in FLAGS.specprefill_keep),
      specprefill_draft=FLAGS.specprefill_draft or None, gemfilter_topk=tuple(int(k) for k in FLAGS.gemfilter_topk),
      gemfilter_layer=FLAGS.gemfilter_layer,
      partial=str(Path(FLAGS.output)) + ".partial.jsonl")
  bench_runner.check(spec)  # before the run starts, not in its first group
  return spec


def main():
  from kvp_jax.benchmark import report as bench_report
  from kvp_jax.benchmark import runner as bench_runner
  out = Path(FLAGS.output)
  if out.is_dir():
    raise ValueError(f"--output {out} is a directory; pass a file name such as {out / 'bench.json'}")
  cli.writable_dir(out.parent, "--output's directory")  # before the run, not after it
  spec = _build_spec()
  result = bench_runner.run(spec)
  out.write_text(json.dumps(result, indent=1))
  Path(spec.partial).unlink(missing_ok=True)  # bench.json holds every group now
  print(bench_report.table(result))
  png = out.with_suffix(".png")
  print(f"wrote {out}" + (f" and {png}" if bench_report.plot(result, png) else " (no matplotlib: no plot)"))


if __name__ == "__main__":
  cli.run(main, outputs=lambda: [Path(FLAGS.output).parent])
