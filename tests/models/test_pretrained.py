"""One entry point for pretrained weights (Hugging Face directory or GGUF), GGUF -> Hugging Face conversion and
its cache, on small GGUF files written here."""

import json

import jax
import numpy as np
import pytest

from gguf_writer import TinyVocab, write_gguf
from helpers import random_params
from kvp_jax.models import checkpoints, hf_checkpoint, pretrained
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.hf_checkpoint import CheckpointError

SMALL = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=64, architecture="llama")


def assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def tiny_gguf(path, seed=4):
  vocab = TinyVocab.build()
  cfg = SMALL.replace(vocab_size=len(vocab.tokens), bos_token_id=1, eos_token_id=(2,))
  params = random_params(cfg, seed=seed)
  write_gguf(path, cfg, params, tokenizer=vocab.write)
  return cfg.replace(tie_word_embeddings=False), params


def test_load_pretrained_and_load_model_take_a_gguf_file_or_its_directory(tmp_path):
  cfg0, params = tiny_gguf(tmp_path / "m.gguf")
  for path in (tmp_path / "m.gguf", tmp_path):
    for load in (pretrained.load_pretrained, checkpoints.load_model):
      cfg, got = load(path)
      assert cfg == cfg0
      assert_same(got, params)
  hf_checkpoint.save_pretrained(cfg0, params, tmp_path / "hf")  # and a Hugging Face directory as before
  assert pretrained.load_pretrained(tmp_path / "hf")[0] == cfg0


def test_convert_gguf_writes_a_directory_transformers_and_we_load(tmp_path):
  cfg0, params = tiny_gguf(tmp_path / "m.gguf")
  out = pretrained.convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "generation_config.json"} <= {p.name for p in out.iterdir()}
  cfg, got = hf_checkpoint.load_pretrained(out)
  assert cfg == cfg0
  assert_same(got, params)
  gen = json.loads((out / "generation_config.json").read_text())
  assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
  from transformers import AutoTokenizer
  tok = AutoTokenizer.from_pretrained(str(out))
  assert tok.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tok.chat_template
  with pytest.raises(CheckpointError, match="already exists and is not an empty directory"):
    pretrained.convert_gguf(tmp_path / "m.gguf", out)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]  # no temporary left behind


@pytest.mark.torch
def test_converted_directory_loads_in_transformers_with_our_logits(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from kvp_jax.models import decoder
  cfg, params = tiny_gguf(tmp_path / "m.gguf")
  out = pretrained.convert_gguf(tmp_path / "m.gguf", tmp_path / "hf")
  m = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
  with torch.no_grad():
    ref = m(torch.as_tensor(tokens)).logits.numpy()
  assert np.abs(np.asarray(decoder.logits(cfg, params, tokens)) - ref).max() < 1e-4


def test_cached_conversion_converts_once_per_file_content(tmp_path):
  tiny_gguf(tmp_path / "m.gguf", seed=4)
  d = pretrained.cached_conversion(tmp_path / "m.gguf", tmp_path / "cache")
  stamp = (d / "model.safetensors").stat().st_mtime_ns
  assert pretrained.cached_conversion(tmp_path / "m.gguf", tmp_path / "cache") == d
  assert (d / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
  _, params = tiny_gguf(tmp_path / "m.gguf", seed=5)  # same name, new weights: a new entry
  d2 = pretrained.cached_conversion(tmp_path / "m.gguf", tmp_path / "cache")
  assert d2 != d
  assert_same(hf_checkpoint.load_pretrained(d2)[1], params)


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("KVP_JAX_CACHE", str(tmp_path / "c"))
  assert pretrained.default_cache_dir() == tmp_path / "c"
  monkeypatch.delenv("KVP_JAX_CACHE")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
  assert pretrained.default_cache_dir() == tmp_path / "x" / "kvp_jax"
