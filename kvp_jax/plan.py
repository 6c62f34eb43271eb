"""`python -m kvp_jax.plan --flagfile=configs/kvp_llama3_1b_8b.flags --mesh=fsdp:16 [--device_kind=v5e,h100]`

Before paying for accelerators: builds the flagfile's train step (--stage=pretrain, kvp or swiftkv) from shapes
alone (no weights are read), compiles it for the mesh on as many simulated CPU devices
(kvp_jax/training/plan.py), and prints per-device parameter, optimizer, frozen-weight and XLA temporary bytes,
the step's FLOPs, whether it fits each device kind and its step time at --mfu of peak. Takes every
`kvp_jax.train` flag, so the run's own flagfile plans it.

`--runahead`: instead, KV-Runahead's predicted prefill speed-up over tensor parallelism for p = --runahead_ps
devices, from per-chunk times measured on this machine (kvp_jax/benchmark/runahead.py).
"""

from __future__ import annotations

import os

from absl import flags

from kvp_jax import cli
from kvp_jax import train as _train_flags  # noqa: F401  (defines every train flag, so train flagfiles parse)

F = flags.FLAGS
flags.DEFINE_list("device_kind", ["v5e", "h100"], "Device kinds to check the plan against (kvp_jax/training/plan.py "
                  "DEVICE_KINDS: v5e, v4, v5p, a100, h100, h200).")
flags.DEFINE_float("mfu", 0.4, "Fraction of peak FLOP/s the step time is quoted at.")
flags.DEFINE_bool("simulate", True, "Compile on simulated CPU devices, as many as the mesh needs (no accelerator "
                  "needed); false: use the devices JAX finds.")
flags.DEFINE_bool("runahead", False, "Print KV-Runahead's predicted prefill speed-ups instead of a training plan.")
flags.DEFINE_string("runahead_model", None, "Model whose layer is timed (a config.json directory or a known name, "
                    "e.g. Llama-2-7B); default: --base_checkpoint's.")
flags.DEFINE_integer("runahead_prompt_len", 2048, "Prompt length T of the KV-Runahead table.")
flags.DEFINE_list("runahead_ps", ["2", "4", "8", "16"], "Device counts p of the KV-Runahead table.")
flags.DEFINE_list("runahead_systems", ["a100-nvlink", "a100-pcie", "h100-nvlink"], "Target systems "
                  "(kvp_jax/benchmark/runahead.py SYSTEMS).")
flags.DEFINE_integer("runahead_runs", 3, "Timed runs per measured chunk.")
F.set_default("workdir", "unused-by-plan")  # train.py requires it; a plan writes nothing


def _mesh_devices() -> int:
  """Devices the --mesh needs, read without importing JAX (it must start after XLA_FLAGS is set); the full
  check of the value is sharding.parse_mesh's, later."""
  n = 1
  for part in filter(None, (p.strip() for p in F.mesh.split(","))):
    size = part.partition(":")[2]
    if not size.lstrip("-").isdigit():
      raise ValueError(f"--mesh={F.mesh!r}: each entry is AXIS:SIZE, e.g. fsdp:8,model:2")
    if int(size) < 1:
      raise ValueError(f"--mesh={F.mesh}: a plan needs every axis size (no -1); e.g. --mesh=fsdp:16")
    n *= int(size)
  return n


def _plan():
  from kvp_jax.kvp import aux_models, losses
  from kvp_jax.training import plan as plan_lib
  from kvp_jax.training import sharding
  from kvp_jax.training import step as step_lib
  kinds = []
  for k in F.device_kind:
    if k not in plan_lib.DEVICE_KINDS:
      raise ValueError(f"--device_kind={k!r} is not one of {sorted(plan_lib.DEVICE_KINDS)}")
    kinds.append(plan_lib.DEVICE_KINDS[k])
  mesh = sharding.mesh_from_spec(F.mesh)
  compute = step_lib.ComputeConfig(compute_dtype=F.compute_dtype, frozen_dtype=F.frozen_dtype,
                                   grad_accum=F.grad_accum, remat=F.remat)
  ints = lambda v: None if v is None else tuple(int(x) for x in v)
  if F.stage == "kvp":
    if not F.base_checkpoint:
      raise ValueError("--stage=kvp needs --base_checkpoint (a directory with a config.json, or a known name)")
    base_cfg = plan_lib.model_config(F.base_checkpoint)
    aux_cfg = None
    if F.aux == "c":
      if F.aux_checkpoint:
        aux_cfg = plan_lib.model_config(F.aux_checkpoint)
      elif F.aux_model:
        from kvp_jax.models.config import ModelConfig
        aux_cfg = ModelConfig.from_dict({"vocab_size": base_cfg.vocab_size, **_train_flags._json_flag("aux_model")})
      else:
        raise ValueError("--aux=c needs --aux_checkpoint or --aux_model")
    spec = aux_models.AuxSpec(kind=F.aux, lp_keep_fraction=F.lp_keep_fraction or 0.5,
                              lp_keep_layers=ints(F.lp_keep_layers))
    loss = losses.KVPLossConfig(w_base=F.w_base, w_aux=F.w_aux, lambda_c=F.lambda_c, kv_reduce=F.kv_reduce,
                                z_loss=F.z_loss, qk_weight=F.qk_weight, attention_mode=F.attention_mode)
    plan = plan_lib.plan_kvp(base_cfg, aux_cfg, spec, kind=F.predictor, layer_map=ints(F.layer_map), loss=loss,
                             freeze_aux=F.freeze_aux, mesh=mesh, batch_size=F.batch_size, seq_len=F.seq_len,
                             compute=compute)
  elif F.stage == "swiftkv":
    if not F.base_checkpoint:
      raise ValueError("--stage=swiftkv needs --base_checkpoint (a directory with a config.json, or a known name)")
    from kvp_jax.baselines import swiftkv
    loss = swiftkv.SwiftKVLossConfig(temperature=F.swiftkv_temperature, hidden_weight=F.swiftkv_hidden_weight)
    plan = plan_lib.plan_swiftkv(plan_lib.model_config(F.base_checkpoint), F.swiftkv_cutoff, loss, mesh=mesh,
                                 batch_size=F.batch_size, seq_len=F.seq_len, compute=compute)
  else:
    if F.init_checkpoint:
      cfg = plan_lib.model_config(F.init_checkpoint)
    elif F.model:
      from kvp_jax.models.config import ModelConfig
      model = _train_flags._json_flag("model")
      if "vocab_size" not in model:
        raise ValueError("a plan of --stage=pretrain --model=... needs vocab_size in the JSON (no tokenizer is read)")
      cfg = ModelConfig.from_dict(model)
    else:
      raise ValueError("--stage=pretrain needs --model (JSON with vocab_size) or --init_checkpoint")
    plan = plan_lib.plan_pretrain(cfg, z_loss=F.z_loss, mesh=mesh, batch_size=F.batch_size, seq_len=F.seq_len,
                                  compute=compute)
  print(plan_lib.format_plan(plan, kinds, F.mfu))


def _runahead():
  from kvp_jax.benchmark import runahead as bench_runahead
  from kvp_jax.training import plan as plan_lib
  name = F.runahead_model or F.base_checkpoint
  if not name:
    raise ValueError("--runahead needs --runahead_model or --base_checkpoint")
  for s in F.runahead_systems:
    if s not in bench_runahead.SYSTEMS:
      raise ValueError(f"--runahead_systems: {s!r} is not one of {sorted(bench_runahead.SYSTEMS)}")
  cfg = plan_lib.model_config(name)
  T = F.runahead_prompt_len
  result = bench_runahead.runahead_tables(cfg, T, [int(p) for p in F.runahead_ps], F.runahead_systems,
                                          runs=F.runahead_runs)
  print(bench_runahead.format_tables(os.path.basename(str(name).rstrip("/")), T, result))


def main():
  if not F.runahead and F.simulate:
    n = _mesh_devices()
    # Before JAX starts: as many CPU devices as the mesh has (XLA reads the flag once, at backend start). The
    # program is never run, so LLVM need not optimise it: the same buffers and FLOPs, compiled ~2x faster.
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
                               " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
  _runahead() if F.runahead else _plan()


if __name__ == "__main__":
  cli.run(main)  # bad input: one line and exit 2, as every main (kvp_jax/cli.py)
