"""A memory and time plan of a training run, before anyone pays for accelerators.

The train step of a stage is built exactly as `kvp_jax/training/loop.py` builds it (same loss, same rules table,
same shardings, same optimizer), but over `jax.ShapeDtypeStruct`s: no weight is read or allocated. It is lowered
and compiled for the named mesh (on simulated CPU devices when no accelerator is at hand: XLA's buffer
assignment is then the CPU backend's, a close but not exact stand-in for an accelerator's), and the plan
reports per device:
- state: trainable weights, optimizer state and frozen weights, from their shardings (exact);
- XLA's memory analysis of the compiled step: arguments, outputs, aliased (donated) bytes and temporaries
  (activations, gathered FSDP weights, gradients); peak = arguments + outputs - aliased + temporaries;
- FLOPs per device per step from XLA's cost analysis. XLA counts a loop body once, so with gradient
  accumulation the step's count minus the optimizer update's (compiled alone) is the micro-batch, counted k
  times;
and whether that fits a device's memory, and the step time at a stated fraction of its peak FLOP/s.
Model shapes come from a checkpoint's config.json, or for the real pairs' flagfiles (whose paths are
placeholders) from the shapes of the published configs below.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax

from kvp_jax.kvp import aux_models, losses, predictor
from kvp_jax.kvp.predictor import KVPConfig
from kvp_jax.models import hf_checkpoint
from kvp_jax.models import params as P
from kvp_jax.models.checkpoints import MODEL_CONFIG
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.lm_loss import lm_loss
from kvp_jax.training import loop, sharding
from kvp_jax.training import step as step_lib

_LLAMA3 = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, rms_norm_eps=1e-5,
               rope_theta=500000.0, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001)
_QWEN25 = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1000000.0,
               bos_token_id=151643, eos_token_id=151643)
# The shape fields of the published config.json of each model the shipped real-pair flagfiles name (and of
# Llama-2-7B, the model of KV-Runahead's reported speed-up).
KNOWN_HF_CONFIGS = {
    "Llama-2-7B": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
                   "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
                   "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
                   "bos_token_id": 1, "eos_token_id": 2},
    "Llama-3.1-8B": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                     "tie_word_embeddings": False,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "Llama-3.2-1B": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "tie_word_embeddings": True,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    "Qwen2.5-7B": {**_QWEN25, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
                   "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "max_position_embeddings": 131072, "tie_word_embeddings": False},
    "Qwen2.5-0.5B": {**_QWEN25, "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                     "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                     "max_position_embeddings": 32768, "tie_word_embeddings": True},
}


@dataclasses.dataclass(frozen=True)
class DeviceKind:
  name: str
  memory_bytes: float  # per device (HBM)
  peak_flops: float  # dense bf16 FLOP/s per device, from the vendor's datasheet


DEVICE_KINDS = {
    "v5e": DeviceKind("TPU v5e", 16e9, 197e12),
    "v4": DeviceKind("TPU v4", 32e9, 275e12),
    "v5p": DeviceKind("TPU v5p", 95e9, 459e12),
    "a100": DeviceKind("A100 80GB", 80e9, 312e12),
    "h100": DeviceKind("H100 SXM 80GB", 80e9, 989e12),
    "h200": DeviceKind("H200 141GB", 141e9, 989e12),
}


def model_config(path_or_name: str) -> ModelConfig:
  """The ModelConfig of a pretrain workdir or Hugging Face directory; else of a known model by its name."""
  p = Path(path_or_name)
  if (p / MODEL_CONFIG).exists():
    return ModelConfig.from_dict(json.loads((p / MODEL_CONFIG).read_text()))
  if (p / "config.json").exists():
    return hf_checkpoint.config_from_hf(json.loads((p / "config.json").read_text()))
  if p.name in KNOWN_HF_CONFIGS:
    return hf_checkpoint.config_from_hf(KNOWN_HF_CONFIGS[p.name])
  raise ValueError(f"no config.json at {path_or_name} and {p.name!r} is not one of the known models "
                   f"{sorted(KNOWN_HF_CONFIGS)}; point the checkpoint flag at a directory with a config.json")


@dataclasses.dataclass
class Plan:
  what: str
  mesh: dict[str, int]
  batch_size: int
  seq_len: int
  grad_accum: int
  compute: dict[str, Any]
  trainable_params: int
  frozen_params: int
  state_bytes: dict[str, int]  # per device: trainable, opt, frozen
  xla_bytes: dict[str, int]  # per device: argument, output, alias, temp, peak
  flops_per_device: float  # per optimizer step
  compile_seconds: float
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def devices(self) -> int:
    return math.prod(self.mesh.values())

  def fits(self, kind: DeviceKind, headroom: float = 0.9) -> bool:
    """Peak bytes within `headroom` of the device's memory (the runtime and fragmentation take the rest)."""
    return self.xla_bytes["peak"] <= headroom * kind.memory_bytes

  def step_seconds(self, kind: DeviceKind, mfu: float) -> float:
    return self.flops_per_device / (kind.peak_flops * mfu)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def _compile(what, loss_fn, trainable, axes, frozen, frozen_axes, *, mesh, batch_size, seq_len,
             compute: step_lib.ComputeConfig, notes) -> Plan:
  import time
  tx = loop.optimizer(loop.OptimConfig(), steps=1000)
  sh = sharding.param_shardings(trainable, axes, mesh)
  fsh = sharding.param_shardings(frozen, frozen_axes, mesh)
  t_abs, f_abs = _abstract(trainable, sh), _abstract(frozen, fsh)
  osh = step_lib.opt_shardings(tx, t_abs, sh, mesh)
  o_abs = _abstract(jax.eval_shape(tx.init, t_abs), osh)
  bsh = sharding.batch_sharding(mesh)
  if batch_size % (sharding.batch_ways(mesh) * compute.grad_accum):
    raise ValueError(f"--batch_size={batch_size} must be a multiple of the {sharding.batch_ways(mesh)}-way "
                     f"data x fsdp split times --grad_accum={compute.grad_accum}")
  tok = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=bsh)
  batch = {"inputs": tok, "targets": tok,
           "weights": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.float32, sharding=bsh)}
  step = step_lib.jit_step(step_lib.make_step(loss_fn, tx, grad_accum=compute.grad_accum,
                                              compute_dtype=step_lib.DTYPES[compute.compute_dtype],
                                              batch_sharding=bsh), mesh, sh, fsh, osh, bsh)
  t0 = time.perf_counter()
  compiled = step.lower(t_abs, f_abs, o_abs, batch).compile()
  seconds = time.perf_counter() - t0
  m = compiled.memory_analysis()
  xla = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
         "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}
  xla["peak"] = xla["argument"] + xla["output"] - xla["alias"] + xla["temp"]
  flops = _flops(compiled)
  if compute.grad_accum > 1:  # the loop body (one micro-batch) was counted once; the update is outside it
    def update(t, o):
      u, o = tx.update(t, o, t)
      return optax.apply_updates(t, u), o
    upd = _flops(jax.jit(update, in_shardings=(sh, osh), out_shardings=(sh, osh)).lower(t_abs, o_abs).compile())
    flops = upd + compute.grad_accum * (flops - upd)
  return Plan(what=what, mesh={k: v for k, v in mesh.shape.items() if v > 1} or {"data": 1},
              batch_size=batch_size, seq_len=seq_len, grad_accum=compute.grad_accum,
              compute=dataclasses.asdict(compute), trainable_params=_count(trainable), frozen_params=_count(frozen),
              state_bytes={"trainable": sharding.device_bytes(t_abs), "opt": sharding.device_bytes(o_abs),
                           "frozen": sharding.device_bytes(f_abs)},
              xla_bytes=xla, flops_per_device=flops, compile_seconds=seconds, notes=notes)


def plan_kvp(base_cfg: ModelConfig, aux_cfg: ModelConfig | None, aux_spec: aux_models.AuxSpec, *, kind: str,
             layer_map, loss: losses.KVPLossConfig, freeze_aux: bool, mesh, batch_size: int, seq_len: int,
             compute: step_lib.ComputeConfig) -> Plan:
  """The kvp stage's step (stages.kvp) for a base and an aux, built from shapes alone."""
  notes = []
  if aux_spec.kind == "lp":
    keep = aux_spec.lp_keep_layers or aux_models.lp_keep_layers(base_cfg.num_layers, aux_spec.lp_keep_fraction)
    aux_cfg, default_map = base_cfg.replace(num_layers=len(keep)), aux_models.lp_layer_map(base_cfg.num_layers, keep)
  else:
    default_map = aux_models.c_layer_map(base_cfg.num_layers, aux_cfg.num_layers)
    if aux_cfg.vocab_size != base_cfg.vocab_size:
      notes.append(f"embedding tables differ (base {base_cfg.vocab_size} rows, aux {aux_cfg.vocab_size}): `train` "
                   "accepts the pair only if both checkpoints carry the same tokenizer and it fits both tables "
                   "(aux_models.check_compatible)")
  lm = aux_models.check_layer_map(layer_map or default_map, base_cfg.num_layers, aux_cfg.num_layers)
  kcfg = KVPConfig(base=base_cfg, aux=aux_cfg, kind=kind, layer_map=lm)
  frozen_dtype = step_lib.DTYPES[compute.frozen_dtype]
  aux_abs = P.abstract(aux_cfg, jnp.float32)
  pred_abs = jax.eval_shape(lambda k: predictor.init(kcfg, k, how="random"), jax.random.PRNGKey(0))
  trainable = {"pred": pred_abs} if freeze_aux else {"aux": aux_abs, "pred": pred_abs}
  axes = {"pred": predictor.logical_axes(kcfg)} | ({} if freeze_aux else {"aux": P.logical_axes(aux_cfg)})
  frozen = {"base": P.abstract(base_cfg, frozen_dtype)} | (
      {"aux": P.abstract(aux_cfg, frozen_dtype)} if freeze_aux else {})
  frozen_axes = {"base": P.logical_axes(base_cfg)} | ({"aux": P.logical_axes(aux_cfg)} if freeze_aux else {})
  loss_fn = lambda t, f, b: losses.kvp_loss(kcfg, loss, t, {k: v for k, v in f.items() if k != "base"},
                                            f["base"], b, remat=compute.remat)
  return _compile("kvp", loss_fn, trainable, axes, frozen, frozen_axes, mesh=mesh, batch_size=batch_size,
                  seq_len=seq_len, compute=compute, notes=notes)


def plan_swiftkv(base_cfg: ModelConfig, cutoff: float, loss: Any, *, mesh, batch_size: int, seq_len: int,
                 compute: step_lib.ComputeConfig) -> Plan:
  """The swiftkv stage's step (stages.swiftkv): SwiftKV's new weights train against the frozen base."""
  from kvp_jax.baselines import swiftkv as swiftkv_lib
  k = swiftkv_lib.cutoff_layers(base_cfg.num_layers, cutoff)
  base = P.abstract(base_cfg, step_lib.DTYPES[compute.frozen_dtype])
  skv = jax.eval_shape(lambda b: P.cast(swiftkv_lib.init_from_base(base_cfg, b, k), jnp.float32), base)
  loss_fn = lambda t, f, b: swiftkv_lib.swiftkv_loss(base_cfg, loss, t, f["base"], b, remat=compute.remat)
  return _compile("swiftkv", loss_fn, skv, swiftkv_lib.logical_axes(skv), {"base": base},
                  {"base": P.logical_axes(base_cfg)}, mesh=mesh, batch_size=batch_size, seq_len=seq_len,
                  compute=compute, notes=[f"SwiftKV cutoff k={k} of {base_cfg.num_layers} layers"])


def plan_pretrain(cfg: ModelConfig, *, z_loss: float, mesh, batch_size: int, seq_len: int,
                  compute: step_lib.ComputeConfig) -> Plan:
  loss_fn = lambda p, _, b: lm_loss(cfg, p, b, z_loss, remat=compute.remat)
  return _compile("pretrain", loss_fn, P.abstract(cfg), P.logical_axes(cfg), {}, {}, mesh=mesh,
                  batch_size=batch_size, seq_len=seq_len, compute=compute, notes=[])


def _gb(n: float) -> str:
  return f"{n / 1e9:.2f}" if n >= 1e8 or n == 0 else f"{n / 1e9:.4f}"


def format_plan(plan: Plan, kinds: list[DeviceKind], mfu: float) -> str:
  """A short report: the run, bytes per device, FLOPs, and per device kind whether it fits and how fast."""
  mesh = ",".join(f"{k}:{v}" for k, v in plan.mesh.items())
  c = plan.compute
  lines = [
      f"plan: {plan.what} step, mesh {mesh} ({plan.devices} devices), batch {plan.batch_size} x {plan.seq_len} "
      f"tokens in {plan.grad_accum} micro-batch(es), compute {c['compute_dtype']}, frozen {c['frozen_dtype']}, "
      f"remat {c['remat']}",
      f"params: trainable {plan.trainable_params / 1e9:.3f}B, frozen {plan.frozen_params / 1e9:.3f}B",
      "per device (GB): " + ", ".join(f"{k} {_gb(v)}" for k, v in plan.state_bytes.items())
      + " | XLA: " + ", ".join(f"{k} {_gb(v)}" for k, v in plan.xla_bytes.items()),
      f"FLOPs per device per step: {plan.flops_per_device:.3e} (compiled in {plan.compile_seconds:.0f} s)",
  ]
  for kind in kinds:
    verdict = "fits" if plan.fits(kind) else "does NOT fit"
    lines.append(f"  {kind.name}: peak {_gb(plan.xla_bytes['peak'])} of {_gb(kind.memory_bytes)} GB -> {verdict}; "
                 f"step {plan.step_seconds(kind, mfu):.2f} s at {mfu:.0%} of {kind.peak_flops / 1e12:.0f} TFLOP/s")
  lines += [f"note: {n}" for n in plan.notes]
  return "\n".join(lines)
