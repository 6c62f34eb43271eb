"""Every evaluable method by name: a `MethodSpec` string ("kvp:lp0.50@runs/q/kvp_lp0.50;kv_reduce=sum") is
parsed and built into a ttft.Method by `BUILDERS`; adding a method is one entry there.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

from kvp_jax.kvp import checkpoints as kvp_checkpoints
from kvp_jax.kvp import inference
from kvp_jax.models import checkpoints
from kvp_jax.ttft import method as ttft


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """`METHOD[:AUX][@PATH][;KEY=VALUE]...`: which builder, which aux label, which checkpoint, which settings.

  Settings go to the row's `settings` (for kvp they describe a trained variant; other builders may read them
  as arguments). Values are parsed as JSON where they can be (so 2 is an int), else kept as strings.
  """
  method: str
  aux: str | None = None
  path: str | None = None
  settings: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def parse(cls, text: str) -> "MethodSpec":
    head, *pairs = text.strip().split(";")
    head, _, path = head.partition("@")
    method, _, aux = head.partition(":")
    settings = []
    for p in pairs:
      k, eq, v = p.partition("=")
      if not eq or not k:
        raise ValueError(f"method spec {text!r}: setting {p!r} is not KEY=VALUE")
      try:
        v = json.loads(v)
      except json.JSONDecodeError:
        pass
      settings.append((k.strip(), v))
    if method not in BUILDERS:
      raise ValueError(f"method spec {text!r}: unknown method {method!r}; known: {sorted(BUILDERS)}")
    return cls(method, aux or None, path or None, tuple(settings))

  def __str__(self) -> str:
    s = self.method + (f":{self.aux}" if self.aux else "") + (f"@{self.path}" if self.path else "")
    return s + "".join(f";{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in self.settings)


class Models:
  """Loads each checkpoint once; every kvp workdir must have been trained against this base."""

  def __init__(self, base_checkpoint: str):
    self.base_path = str(base_checkpoint)
    self.base = checkpoints.load_model(base_checkpoint)
    self._models, self._kvps, self._swiftkvs = {}, {}, {}

  def model(self, path: str):
    if path not in self._models:
      self._models[path] = checkpoints.load_model(path)
    return self._models[path]

  def pruned(self, label: str | None):
    """The base with only an LP label's layers ("lp0.50": half of them, kvp.aux_models.lp_keep_layers), untrained:
    LP alone (and a SpecPrefill draft) at zero fine-tuning steps, beside a KVP least-squares fit."""
    from kvp_jax.kvp import aux_models
    try:
      fraction = float(label.removeprefix("lp")) if label and label.startswith("lp") else None
    except ValueError:
      fraction = None
    if fraction is None:
      raise ValueError(f"untrained layer pruning needs a label lpF (e.g. lp0.50), got {label!r}; or name a "
                       "fine-tuned model as AUX@PATH")
    key = ("pruned", label)  # never a checkpoint path's key
    if key not in self._models:
      cfg, params = self.base
      self._models[key] = aux_models.prune_layers(cfg, params, aux_models.lp_keep_layers(cfg.num_layers, fraction))
    return self._models[key]

  def swiftkv(self, path: str):
    if path not in self._swiftkvs:
      from kvp_jax.baselines import swiftkv
      cfg, base, skv = swiftkv.load_swiftkv(path, base_params=self.base[1])
      if cfg != self.base[0]:
        raise ValueError(f"{path} was trained against another base than {self.base_path}")
      self._swiftkvs[path] = (cfg, base, skv)
    return self._swiftkvs[path]

  def kvp(self, path: str):
    if path not in self._kvps:
      kcfg, base, kp = kvp_checkpoints.load_kvp(path, base_params=self.base[1])
      if kcfg.base != self.base[0]:
        raise ValueError(f"{path} was trained against another base than {self.base_path}")
      self._kvps[path] = (kcfg, base, kp)
    return self._kvps[path]


def _needs_path(spec: MethodSpec) -> str:
  if not spec.path:
    raise ValueError(f"method {spec.method!r} needs a checkpoint: write it as {spec.method}:AUX@PATH")
  return spec.path


def _settings(spec: MethodSpec) -> dict:
  return dict(spec.settings)


def _lazyllm(spec: MethodSpec, models: Models) -> ttft.Method:
  from kvp_jax.baselines import pruning  # imported when used: a method's module never slows or breaks the others
  kw = _settings(spec)
  if isinstance(kw.get("schedule"), str):
    kw["schedule"] = pruning.parse_schedule(kw["schedule"])
  return pruning.lazyllm_method(*models.base, **kw)


def _pruned(fn: str) -> Callable[[MethodSpec, Models], ttft.Method]:
  def build(spec: MethodSpec, models: Models) -> ttft.Method:
    from kvp_jax.baselines import pruning
    return getattr(pruning, fn)(*models.base, **_settings(spec))
  return build


def _recompute(spec: MethodSpec, models: Models) -> ttft.Method:
  from kvp_jax.baselines import recompute
  return recompute.recompute_method(*models.kvp(_needs_path(spec)), aux=spec.aux, **_settings(spec))


def _swiftkv(spec: MethodSpec, models: Models) -> ttft.Method:
  """`swiftkv@WORKDIR` (trained by --stage=swiftkv), or `swiftkv;cutoff=F` untrained (initialised from the base)."""
  from kvp_jax.baselines import swiftkv
  kw = _settings(spec)
  if spec.path:
    if "cutoff" in kw:
      raise ValueError(f"method spec {spec}: a trained SwiftKV's cutoff is its workdir's; drop cutoff=")
    return _described(swiftkv.swiftkv_method(*models.swiftkv(spec.path)), spec)
  if "cutoff" not in kw:
    raise ValueError(f"method spec {spec}: write swiftkv@WORKDIR (trained) or swiftkv;cutoff=F (untrained)")
  cfg, base = models.base
  m = swiftkv.swiftkv_method(cfg, base, swiftkv.init_from_base(cfg, base, swiftkv.cutoff_layers(
      cfg.num_layers, float(kw.pop("cutoff")))))
  return dataclasses.replace(m, settings={**m.settings, "trained": False, **kw})


def _specprefill(spec: MethodSpec, models: Models) -> ttft.Method:
  """`specprefill:DRAFT@DRAFT_CHECKPOINT;keep=P[;keep_last=false;look_ahead=8;chunk=32;pool_kernel=13]`, or
  `specprefill:lpF;keep=P` with the base's layers pruned to F, untrained, as the draft."""
  from kvp_jax.baselines import specprefill
  if not spec.aux or "keep" not in dict(spec.settings):
    raise ValueError(f"method spec {spec}: write specprefill:DRAFT_NAME@DRAFT_CHECKPOINT;keep=P")
  draft = models.model(spec.path) if spec.path else models.pruned(spec.aux)
  return specprefill.specprefill_method(*models.base, *draft, draft_name=spec.aux, **_settings(spec))


def _gemfilter(spec: MethodSpec, models: Models) -> ttft.Method:
  """`gemfilter;topk=K[;layer=R;pool_kernel=5]` (layer defaults to their Llama setting, scaled)."""
  from kvp_jax.baselines import gemfilter
  if "topk" not in dict(spec.settings):
    raise ValueError(f"method spec {spec}: write gemfilter;topk=K (tokens kept)")
  return gemfilter.gemfilter_method(*models.base, **_settings(spec))


def _described(m: ttft.Method, spec: MethodSpec) -> ttft.Method:
  return dataclasses.replace(m, settings={**m.settings, **dict(spec.settings)})


BUILDERS: dict[str, Callable[[MethodSpec, Models], ttft.Method]] = {
    "base": lambda s, ms: ttft.model_method("base", *(ms.model(s.path) if s.path else ms.base)),
    "aux_only": lambda s, ms: _described(ttft.model_method("aux_only", *ms.model(_needs_path(s)), aux=s.aux), s),
    # "lp_alone:lp0.50@DIR" fine-tuned; "lp_alone:lp0.50;train_steps=0" the base's layers pruned, untrained.
    "lp_alone": lambda s, ms: _described(ttft.model_method(
        "lp_alone", *(ms.model(s.path) if s.path else ms.pruned(s.aux)), aux=s.aux), s),
    "kvp": lambda s, ms: _described(inference.kvp_method(*ms.kvp(_needs_path(s)), aux=s.aux), s),
    # These read their settings as arguments (e.g. "random_prune;keep=0.5", "kvp_recompute:lp0.50@DIR;
    # num_intervals=2;interval_size=16", "lazyllm;schedule=1:0.7,2:0.5").
    "kvp_recompute": _recompute,
    "lazyllm": _lazyllm,
    "random_prune": _pruned("random_prune_method"),
    "static_prune": _pruned("static_prune_method"),
    # Rivals (baselines/): "swiftkv@DIR", "specprefill:c@DIR;keep=0.3", "gemfilter;topk=128".
    "swiftkv": _swiftkv,
    "specprefill": _specprefill,
    "gemfilter": _gemfilter,
}


def spec_label(spec: MethodSpec) -> str:
  """The row label a spec gets (as ttft.Method.label), without building the method."""
  extra = ",".join(f"{k}={v}" for k, v in spec.settings)
  return spec.method + (f"[{spec.aux}]" if spec.aux else "") + (f"({extra})" if extra else "")
