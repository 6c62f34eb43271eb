"""Hugging Face checkpoints <-> kvp_jax `Params`: safetensors only, never pickle, never remote code.

Reads a local directory (config.json + model.safetensors or a sharded model.safetensors.index.json) of a
LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM; a hub name is resolved with huggingface_hub where
the network allows. Writes the same layout back so `transformers.AutoModelForCausalLM.from_pretrained` loads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from kvp_jax.models.config import ModelConfig, RopeScaling
from kvp_jax.models.params import LayerParams, Params

ARCH_BY_HF = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
HF_BY_ARCH = {v: k for k, v in ARCH_BY_HF.items()}
MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded; the message says what was wrong and what to do."""


def resolve(path_or_name: str | os.PathLike) -> Path:
  """A local directory as is; otherwise a hub name, downloaded (safetensors and json only) where possible."""
  p = Path(path_or_name).expanduser()
  if p.is_dir():
    return p
  if p.exists():
    raise CheckpointError(f"{p} is a file; pass the checkpoint directory that holds config.json")
  name = str(path_or_name)
  if name.count("/") != 1 or name.startswith(("/", ".")):
    raise CheckpointError(f"no checkpoint directory at {p}; pass a local Hugging Face directory or a hub name")
  try:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
  except Exception as e:  # network, auth or name errors all end the same way for the user
    raise CheckpointError(f"could not fetch {name!r} from the hub ({type(e).__name__}); "
                          "download it elsewhere and pass the local directory") from None


# ----------------------------------------------------------------------------- config


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  rtype = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  src = params if params.get("rope_type") == "llama3" else scaling
  if rtype == "default":
    return float(theta), None
  if rtype == "llama3":
    return float(theta), RopeScaling(
        factor=float(src["factor"]), low_freq_factor=float(src["low_freq_factor"]),
        high_freq_factor=float(src["high_freq_factor"]),
        original_max_position_embeddings=int(src["original_max_position_embeddings"]))
  raise CheckpointError(f"rope type {rtype!r} is not supported (supported: default, llama3)")


def config_from_hf(hf: dict) -> ModelConfig:
  archs = hf.get("architectures") or []
  arch = next((ARCH_BY_HF[a] for a in archs if a in ARCH_BY_HF), None)
  if arch is None:
    arch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(hf.get("model_type"))
  if arch is None:
    raise CheckpointError(f"unsupported architecture {archs or hf.get('model_type')!r}; "
                          f"kvp_jax loads {sorted(ARCH_BY_HF)}")
  if hf.get("mlp_bias"):
    raise CheckpointError("mlp_bias=True is not supported (no Llama/Qwen checkpoint we target uses it)")
  if hf.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"hidden_act={hf.get('hidden_act')!r} is not supported; kvp_jax implements SwiGLU (silu)")
  if arch != "qwen2" and hf.get("attention_bias"):
    raise CheckpointError(f"attention_bias=True on {HF_BY_ARCH[arch]} also biases o_proj, which kvp_jax does not "
                          "implement; only Qwen2's q/k/v biases are supported")
  theta, scaling = _rope_from_hf(hf)
  n_heads = hf["num_attention_heads"]
  eos = hf.get("eos_token_id")
  eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
  return ModelConfig(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"], num_heads=n_heads,
      num_kv_heads=hf.get("num_key_value_heads") or n_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, rope_theta=theta, rope_scaling=scaling,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_bias=arch == "qwen2",
      qk_norm=arch == "qwen3", max_position_embeddings=hf.get("max_position_embeddings", 4096),
      architecture=arch, bos_token_id=hf.get("bos_token_id"), eos_token_id=eos)


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict:
  if cfg.attention_bias and cfg.architecture != "qwen2":
    # transformers' Llama/Qwen3 tie an o_proj bias to the same flag; it would load randomly initialised.
    raise CheckpointError(f"a {cfg.architecture} config with attention_bias=True has no transformers equivalent "
                          "(its o_proj would gain a bias); use architecture='qwen2' for q/k/v biases")
  rope: dict = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings)
  hf = {
      "architectures": [HF_BY_ARCH[cfg.architecture]], "model_type": MODEL_TYPE[cfg.architecture],
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_word_embeddings, "rope_theta": cfg.rope_theta, "rope_parameters": rope,
      "bos_token_id": cfg.bos_token_id,
      "eos_token_id": (list(cfg.eos_token_id) if len(cfg.eos_token_id) > 1 else
                       (cfg.eos_token_id[0] if cfg.eos_token_id else None)),
      "dtype": dtype, "use_cache": True,
  }
  if cfg.rope_scaling is not None:
    hf["rope_scaling"] = dict(rope)
  if cfg.architecture == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  elif cfg.architecture == "qwen3":
    hf.update(attention_bias=False)
  if cfg.architecture in ("qwen2", "qwen3"):
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
              layer_types=["full_attention"] * cfg.num_layers)
  return hf


# ----------------------------------------------------------------------------- tensors


def _layer_names(i: int) -> dict[str, str]:
  p = f"model.layers.{i}."
  return {
      "attn_norm": p + "input_layernorm.weight", "wq": p + "self_attn.q_proj.weight",
      "wk": p + "self_attn.k_proj.weight", "wv": p + "self_attn.v_proj.weight",
      "wo": p + "self_attn.o_proj.weight", "bq": p + "self_attn.q_proj.bias", "bk": p + "self_attn.k_proj.bias",
      "bv": p + "self_attn.v_proj.bias", "q_norm": p + "self_attn.q_norm.weight",
      "k_norm": p + "self_attn.k_norm.weight", "mlp_norm": p + "post_attention_layernorm.weight",
      "w_gate": p + "mlp.gate_proj.weight", "w_up": p + "mlp.up_proj.weight", "w_down": p + "mlp.down_proj.weight",
  }


def _to_ours(field: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
  """HF tensor (torch Linear layout [out, in]) -> our layout."""
  D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  if field == "wq":
    return w.T.reshape(D, N, H)
  if field in ("wk", "wv"):
    return w.T.reshape(D, K, H)
  if field == "wo":
    return w.T.reshape(N, H, D)
  if field == "bq":
    return w.reshape(N, H)
  if field in ("bk", "bv"):
    return w.reshape(K, H)
  if field in ("w_gate", "w_up", "w_down"):
    return w.T
  return w


def _to_hf(field: str, w: np.ndarray) -> np.ndarray:
  if field in ("wq", "wk", "wv"):
    return w.reshape(w.shape[0], -1).T
  if field == "wo":
    return w.reshape(-1, w.shape[-1]).T
  if field in ("bq", "bk", "bv"):
    return w.reshape(-1)
  if field in ("w_gate", "w_up", "w_down"):
    return w.T
  return w


class _TensorReader:
  """Lazy access to every tensor of a (possibly sharded) safetensors checkpoint, as numpy."""

  def __init__(self, d: Path):
    from safetensors import safe_open
    index = d / "model.safetensors.index.json"
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(f.name for f in d.glob("*.safetensors"))
      if not files:
        bins = [f.name for f in d.glob("*.bin")] + [f.name for f in d.glob("*.pt*")]
        hint = (f" (found {bins[:3]}: pickled weights are never loaded; convert them to safetensors)"
                if bins else "")
        raise CheckpointError(f"no *.safetensors file in {d}{hint or '; pass a directory with model.safetensors'}")
      weight_map = None
    self._handles, self._where = {}, {}
    for f in files:
      try:
        h = safe_open(str(d / f), framework="np")
      except Exception as e:
        raise CheckpointError(f"cannot read {d / f}: {e}; the file is missing or corrupt, re-download it") from None
      self._handles[f] = h
      for k in h.keys():
        self._where[k] = f
    if weight_map is not None:
      missing = sorted(set(weight_map) - set(self._where))
      if missing:
        raise CheckpointError(f"{missing[0]} is listed in the index but absent from {weight_map[missing[0]]}")

  def __contains__(self, name):
    return name in self._where

  def get(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise CheckpointError(f"tensor {name!r} missing from the checkpoint")
    return self._handles[self._where[name]].get_tensor(name)


def load_pretrained(path, dtype=jnp.float32, shardings_for=None) -> tuple[ModelConfig, Params]:
  """Loads (cfg, params) from a Hugging Face directory or hub name; tensors cast to `dtype`.

  shardings_for: cfg -> a Params pytree of shardings to place each tensor into straight from host memory.
  """
  d = resolve(path)
  cfg_file = d / "config.json"
  if not cfg_file.exists():
    raise CheckpointError(f"no config.json in {d}; pass a Hugging Face model directory")
  try:
    cfg = config_from_hf(json.loads(cfg_file.read_text()))
  except (KeyError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{cfg_file} is malformed ({type(e).__name__}: {e})") from None
  r = _TensorReader(d)
  shardings = None if shardings_for is None else shardings_for(cfg)

  def get(name: str, field: str, shape: tuple[int, ...], sharding=None, transpose: bool = False):
    raw = r.get(name)
    w = _to_ours(field, raw.astype(np.float32), cfg)
    if not np.isfinite(w).all():  # a corrupt or diverged file would otherwise evaluate to garbage, silently
      what = "NaN" if np.isnan(w).any() else "infinite"
      raise CheckpointError(f"tensor {name!r} in {d} holds {what} values; the checkpoint is corrupt or comes from "
                            "a diverged run: re-download or re-export it")
    if w.shape != shape:
      raise CheckpointError(f"tensor {name!r} has shape {raw.shape}, config.json implies {shape} in our layout; "
                            "config.json and the weights disagree")
    w = w.T if transpose else w
    if sharding is None:
      return jnp.asarray(w, dtype)
    import jax
    return jax.device_put(w.astype(jnp.dtype(dtype)), sharding)

  from kvp_jax.models.params import param_specs
  specs = param_specs(cfg)
  sh = (lambda f: None) if shardings is None else (lambda f: f(shardings))
  layers = []
  for i, ls in enumerate(specs.layers):
    names = _layer_names(i)
    fields = {f: (None if s is None else get(names[f], f, s.shape, sh(lambda t: getattr(t.layers[i], f))))
              for f, s in vars(ls).items()}
    layers.append(LayerParams(**fields))
  V, D = cfg.vocab_size, cfg.hidden_size
  embed = get("model.embed_tokens.weight", "embed", (V, D), sh(lambda t: t.embed))
  lm_head = None
  if not cfg.tie_word_embeddings:
    lm_head = get("lm_head.weight", "embed", (V, D), sh(lambda t: t.lm_head), transpose=True)
  params = Params(embed=embed, layers=tuple(layers), final_norm=get("model.norm.weight", "norm", (D,),
                                                                    sh(lambda t: t.final_norm)),
                  lm_head=lm_head)
  return cfg, params


def save_pretrained(cfg: ModelConfig, params: Params, path, *, max_shard_bytes: int = 2 << 30) -> Path:
  """Writes config.json + safetensors (sharded with an index past max_shard_bytes) that transformers loads."""
  from safetensors.numpy import save_file
  d = Path(path)
  d.mkdir(parents=True, exist_ok=True)
  tensors: dict[str, np.ndarray] = {"model.embed_tokens.weight": np.asarray(params.embed)}
  for i, lp in enumerate(params.layers):
    for field, name in _layer_names(i).items():
      w = getattr(lp, field)
      if w is None and field in ("bq", "bk", "bv") and cfg.architecture == "qwen2":
        # transformers' Qwen2 always has q/k/v biases (missing ones load randomly initialised); zeros are exact.
        w = np.zeros(getattr(lp, "w" + field[1:]).shape[1:], np.asarray(lp.wq).dtype)
      if w is not None:
        tensors[name] = np.ascontiguousarray(_to_hf(field, np.asarray(w)))
  tensors["model.norm.weight"] = np.asarray(params.final_norm)
  if params.lm_head is not None:
    tensors["lm_head.weight"] = np.ascontiguousarray(np.asarray(params.lm_head).T)
  dtype = str(params.embed.dtype)
  if dtype == "bfloat16":  # safetensors.numpy has no bfloat16; float32 holds it exactly
    tensors = {k: v.astype(np.float32) for k, v in tensors.items()}
  shards, cur, size = [], {}, 0
  for k, v in tensors.items():
    if cur and size + v.nbytes > max_shard_bytes:
      shards.append(cur)
      cur, size = {}, 0
    cur[k], size = v, size + v.nbytes
  shards.append(cur)
  tmp_names = []
  if len(shards) == 1:
    save_file(shards[0], str(d / "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(d / "model.safetensors.tmp", d / "model.safetensors")
  else:
    weight_map = {}
    for j, sh in enumerate(shards):
      name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
      save_file(sh, str(d / (name + ".tmp")), metadata={"format": "pt"})
      tmp_names.append(name)
      weight_map.update({k: name for k in sh})
    for name in tmp_names:
      os.replace(d / (name + ".tmp"), d / name)
    total = sum(v.nbytes for v in tensors.values())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
  (d / "config.json").write_text(json.dumps(config_to_hf(cfg, "float32" if dtype == "bfloat16" else dtype),
                                            indent=1))
  return d
