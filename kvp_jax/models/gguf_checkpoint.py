"""GGUF checkpoints (llama.cpp's one-file format) -> kvp_jax `(ModelConfig, Params)`, read with `gguf`.

A GGUF file holds the config as `{arch}.*` metadata keys, the tokenizer as `tokenizer.ggml.*` keys (see
gguf_tokenizer.py) and every tensor under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ...), often quantized
in blocks. `load_gguf` dequantizes each tensor to float32 with `gguf.dequantize`, so every type that function
unpacks loads here, undoes the row permutation llama.cpp's converter applies to Llama queries and keys, and maps
the names onto `Params`. Nothing is unpickled and nothing in the file is executed.
Shape legend: see kvp_jax/models/config.py.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np

from kvp_jax.models import rope
from kvp_jax.models.config import ModelConfig, RopeScaling
from kvp_jax.models.hf_checkpoint import CheckpointError, _to_ours
from kvp_jax.models.params import LayerParams, Params, param_specs

ARCHITECTURES = ("llama", "qwen2", "qwen3")
# llama.cpp's LlamaModel.permute interleaves the two rotary halves of each q/k head's rows (its RoPE rotates
# adjacent pairs); Qwen2/Qwen3 are converted without it (their GGUF RoPE is the NeoX kind, like ours).
_PERMUTED = ("llama",)

# Params field -> GGUF tensor name inside block N
_LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
    "wo": "attn_output.weight", "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
    "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight", "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
}


def find_gguf(path) -> Path | None:
  """The GGUF file `path` names: itself if it is one, the single *.gguf in a directory without config.json."""
  p = Path(path).expanduser()
  if p.is_file():
    return p if p.suffix == ".gguf" else None
  if not p.is_dir() or (p / "config.json").exists():
    return None
  found = sorted(p.glob("*.gguf"))
  if len(found) > 1:
    raise CheckpointError(f"{p} holds {len(found)} GGUF files ({', '.join(f.name for f in found[:3])}...); "
                          "pass the one to load")
  return found[0] if found else None


def open_gguf(path):
  """A `gguf.GGUFReader` over the file; a truncated or foreign file raises a one-line CheckpointError."""
  p = find_gguf(path) or Path(path)
  try:
    return gguf.GGUFReader(str(p))
  except Exception as e:  # the reader raises ValueError, IndexError, KeyError... on a damaged file
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise CheckpointError(f"cannot read {p} as GGUF ({type(e).__name__}: {msg}); the file is truncated, damaged "
                          "or not a GGUF file") from None


def metadata(reader, key: str, default=None):
  """One metadata value as a Python scalar, string or list; `default` when the key is absent.

  A float32 value comes back as the shortest decimal that rounds to it (1e-05, not 9.999999747378752e-06): the
  number the converter was given.
  """
  field = reader.fields.get(key)
  if field is None:
    return default
  if field.types == [gguf.GGUFValueType.FLOAT32]:
    return float(str(field.parts[-1][0]))
  return field.contents()


# ----------------------------------------------------------------------------- config


def _rope_scaling(reader, arch: str, tensors: dict, base: ModelConfig) -> RopeScaling | None:
  """Llama-3 frequency scaling, which llama.cpp stores as a `rope_freqs.weight` tensor of per-frequency divisors."""
  kind = metadata(reader, f"{arch}.rope.scaling.type", "none")
  if kind not in ("none", ""):
    raise CheckpointError(f"{arch}.rope.scaling.type={kind!r} is not supported (kvp_jax implements plain RoPE and "
                          "Llama-3 scaling)")
  if "rope_freqs.weight" not in tensors:
    return None
  t = tensors["rope_freqs.weight"]
  divisors = gguf.dequantize(t.data, t.tensor_type).reshape(-1).astype(np.float64)
  # Meta's Llama 3.1-3.3 values; the file stores only their effect, so a match is checked rather than solved for.
  guess = RopeScaling(factor=float(divisors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=int(
                          metadata(reader, f"{arch}.rope.scaling.original_context_length", 8192)))
  plain = rope.inv_frequencies(base.replace(rope_scaling=None)).astype(np.float64)
  implied = plain / rope.inv_frequencies(base.replace(rope_scaling=guess)).astype(np.float64)
  if divisors.shape != implied.shape or not np.allclose(divisors, implied, rtol=1e-4):
    raise CheckpointError("rope_freqs.weight holds frequency factors other than Llama-3 scaling with low/high "
                          f"frequency factors 1/4 and original context {guess.original_max_position_embeddings}; "
                          "this scaling is not supported")
  return guess


def config_from_gguf(reader) -> ModelConfig:
  """ModelConfig from the `{arch}.*` keys; the vocabulary size from the embedding's shape."""
  arch = metadata(reader, "general.architecture")
  if arch not in ARCHITECTURES:
    raise CheckpointError(f"unsupported GGUF architecture {arch!r}; kvp_jax loads {', '.join(ARCHITECTURES)}")
  tensors = {t.name: t for t in reader.tensors}

  def key(name, default=None, required=True):
    v = metadata(reader, f"{arch}.{name}", default)
    if v is None and required:
      raise CheckpointError(f"GGUF metadata key {arch}.{name} is missing; the file is incomplete")
    return v

  if "token_embd.weight" not in tensors:
    raise CheckpointError("tensor 'token_embd.weight' missing from the GGUF file")
  D, n_heads = key("embedding_length"), key("attention.head_count")
  head_dim = key("attention.key_length", required=False) or D // n_heads
  rot = key("rope.dimension_count", required=False)
  if rot is not None and rot != head_dim:
    raise CheckpointError(f"{arch}.rope.dimension_count={rot} rotates part of a head of {head_dim}; partial rotary "
                          "embeddings are not supported")
  eos = [metadata(reader, f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id")]
  cfg = ModelConfig(
      vocab_size=int(tensors["token_embd.weight"].shape[-1]), hidden_size=D,
      intermediate_size=key("feed_forward_length"), num_layers=key("block_count"), num_heads=n_heads,
      num_kv_heads=key("attention.head_count_kv", required=False) or n_heads, head_dim=head_dim,
      rope_theta=float(key("rope.freq_base", 10000.0)),
      rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
      tie_word_embeddings="output.weight" not in tensors, attention_bias=arch == "qwen2", qk_norm=arch == "qwen3",
      max_position_embeddings=key("context_length", 4096), architecture=arch,
      bos_token_id=metadata(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=tuple(dict.fromkeys(int(e) for e in eos if e is not None)))
  return cfg.replace(rope_scaling=_rope_scaling(reader, arch, tensors, cfg))


# ----------------------------------------------------------------------------- tensors


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute(w, n_head, ...)`: per head, rows (H/2, 2) interleaved back to (2, H/2)."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _dequantize(t) -> np.ndarray:
  """float32 in torch layout ([out, in] for a matrix) from any type `gguf.dequantize` unpacks."""
  return np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32).reshape([int(n) for n in reversed(t.shape)])


def _check_types(tensors) -> None:
  """Fails before any real work if some tensor's type is one gguf cannot dequantize (one row of each type is tried)."""
  for t in {t.tensor_type: t for t in tensors}.values():
    try:
      gguf.dequantize(t.data[:1] if t.data.ndim > 1 else t.data, t.tensor_type)
    except NotImplementedError:
      raise CheckpointError(f"tensor {t.name!r} is stored as {t.tensor_type.name}, which gguf "
                            f"{importlib.metadata.version('gguf')} cannot dequantize; use a file quantized to "
                            "another type (e.g. Q8_0, Q4_K, Q6_K)") from None


def _expected_tensors(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
  """GGUF name -> (Params field, shape in our layout) of every tensor the config needs."""
  V, D = cfg.vocab_size, cfg.hidden_size
  out = {"token_embd.weight": ("embed", (V, D)), "output_norm.weight": ("norm", (D,))}
  if not cfg.tie_word_embeddings:
    out["output.weight"] = ("embed", (V, D))
  for i, ls in enumerate(param_specs(cfg).layers):
    out.update({f"blk.{i}.{_LAYER_TENSORS[f]}": (f, s.shape) for f, s in vars(ls).items() if s is not None})
  return out


def load_gguf(path, dtype=jnp.float32, *, reader=None) -> tuple[ModelConfig, Params]:
  """(cfg, params) from a .gguf file (or a directory holding one); tensors dequantized, then cast to `dtype`."""
  reader = open_gguf(path) if reader is None else reader
  cfg = config_from_gguf(reader)
  tensors = {t.name: t for t in reader.tensors}
  expected = _expected_tensors(cfg)
  missing = [n for n in expected if n not in tensors]
  if missing:
    raise CheckpointError(f"tensor {missing[0]!r} missing from the {cfg.architecture} GGUF file "
                          f"({len(missing)} missing in all)")
  unexpected = sorted(set(tensors) - set(expected) - {"rope_freqs.weight"})
  if unexpected:  # e.g. biases on a Llama: loading without them would silently change the model
    raise CheckpointError(f"tensor {unexpected[0]!r} ({len(unexpected)} unexpected in all) has no place in a "
                          f"{cfg.architecture} model in kvp_jax; this variant is not supported")
  _check_types(tensors.values())

  def get(name: str):
    field, shape = expected[name]
    t = tensors[name]
    w = _dequantize(t)
    if cfg.architecture in _PERMUTED and field in ("wq", "wk"):
      w = unpermute_rows(w, cfg.num_heads if field == "wq" else cfg.num_kv_heads)
    try:
      w = _to_ours(field, w, cfg)
    except ValueError:  # a reshape that cannot fit
      w = None
    if w is None or w.shape != shape:
      raise CheckpointError(f"tensor {name!r} has shape {tuple(int(n) for n in reversed(t.shape))}, but the "
                            f"metadata implies {shape} in our layout; the file is inconsistent")
    return jnp.asarray(w, dtype)

  layers = tuple(
      LayerParams(**{f: None if s is None else get(f"blk.{i}.{_LAYER_TENSORS[f]}") for f, s in vars(ls).items()})
      for i, ls in enumerate(param_specs(cfg).layers))
  lm_head = None if cfg.tie_word_embeddings else get("output.weight").T
  return cfg, Params(embed=get("token_embd.weight"), layers=layers, final_norm=get("output_norm.weight"),
                     lm_head=lm_head)
