"""Generates from a small random Llama (or `--checkpoint`) and prints the tokens and timings.

  python -m kvp_jax.demo                                  # random 4-layer Llama, random prompt
  python -m kvp_jax.demo --checkpoint=DIR --prompt="Hi"   # a local Hugging Face Llama/Qwen2/Qwen3 directory

Timings are wall-clock on whatever JAX runs on: the first call includes compilation; the warm call is timed
in two parts, prefill plus the first token (time to first token) and the decode loop.
"""

from __future__ import annotations

import time

from absl import flags

from kvp_jax import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Hugging Face model directory; default: a random small Llama")
_PROMPT = flags.DEFINE_string("prompt", None, "prompt text (needs a tokenizer in --checkpoint)")
_PROMPT_IDS = flags.DEFINE_list("prompt_ids", None, "prompt token ids, comma-separated; default: 24 random ids")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 32, "tokens to generate")
_SAMPLE = flags.DEFINE_bool("sample", False, "sample instead of greedy decoding")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "sampling temperature (with --sample)")
_TOP_K = flags.DEFINE_integer("top_k", None, "top-k sampling (with --sample)")
_TOP_P = flags.DEFINE_float("top_p", None, "nucleus sampling mass (with --sample)")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for the random model, prompt and sampling")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype")
cli.at_least("max_new_tokens", 1)
cli.at_least("top_k", 1)
cli.finite_above("temperature", 0.0)
cli.fraction("top_p")
cli.ints("prompt_ids", 0)


def _model(dtype):
  import jax

  from kvp_jax.models import config, params
  if _CHECKPOINT.value:
    from kvp_jax.models.hf_checkpoint import load_pretrained
    return load_pretrained(_CHECKPOINT.value, dtype)
  cfg = config.ModelConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8,
                           num_kv_heads=2, head_dim=32, max_position_embeddings=2048)
  return cfg, jax.jit(params.init, static_argnums=(0, 2))(cfg, jax.random.key(_SEED.value), dtype)


def _tokenizer():
  from pathlib import Path
  d = Path(_CHECKPOINT.value or "")
  if not _CHECKPOINT.value or not any((d / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
    return None
  try:
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(_CHECKPOINT.value, local_files_only=True)
  except Exception:  # no tokenizer files: token ids only
    return None


def main():
  import jax
  import jax.numpy as jnp
  import numpy as np

  from kvp_jax.models import generation

  dtype = jnp.bfloat16 if _DTYPE.value == "bfloat16" else jnp.float32
  cfg, params = _model(dtype)
  tok = _tokenizer()
  if _PROMPT.value is not None:
    if tok is None:
      raise ValueError("--prompt needs a tokenizer in --checkpoint; pass --prompt_ids instead")
    prompt = tok(_PROMPT.value)["input_ids"]
  elif _PROMPT_IDS.value:
    prompt = [int(t) for t in _PROMPT_IDS.value]
  else:
    prompt = np.random.default_rng(_SEED.value).integers(0, cfg.vocab_size, 24).tolist()
  kw = dict(greedy=not _SAMPLE.value, stop_tokens=cfg.eos_token_id)
  if _SAMPLE.value:
    kw.update(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, key=jax.random.key(_SEED.value))
  print(f"model: {cfg.architecture}, {cfg.num_params() / 1e6:.1f}M parameters, {_DTYPE.value}, "
        f"on {jax.devices()[0].platform}; prompt of {len(prompt)} tokens")

  t0 = time.perf_counter()
  out = generation.generate(cfg, params, [prompt], _MAX_NEW.value, **kw)[0]
  first_call = time.perf_counter() - t0

  # The warm call, in the same two parts generate() runs: bucketed prefill, then the decode loop.
  new = _MAX_NEW.value
  bucket = generation.bucket_length(len(prompt))
  tokens, starts = generation.pad_prompts([prompt], 0, bucket)
  t0 = time.perf_counter()
  logits, cache = generation.prefill_jit(cfg, params, jnp.asarray(tokens), jnp.asarray(starts), max_len=bucket + new)
  logits.block_until_ready()
  ttft = time.perf_counter() - t0
  t0 = time.perf_counter()
  gen = generation.decode_from(cfg, params, logits, cache, new, **kw).tokens.block_until_ready()
  decode = time.perf_counter() - t0

  new_ids = out[len(prompt):]
  print("prompt ids:", prompt)
  print("new ids:   ", new_ids)
  if tok is not None:
    print("text:", tok.decode(new_ids))
  print(f"first call (compiles): {first_call:.2f}s; warm: prefill {ttft * 1e3:.1f} ms (bucket {bucket}), "
        f"decode {gen.shape[1]} tokens in {decode * 1e3:.1f} ms ({gen.shape[1] / decode:.0f} tokens/s)")


if __name__ == "__main__":
  cli.run(main)
