"""The benchmark's peers run the same model as ours: llama.cpp on a tiny float32 GGUF, and ONNX Runtime on
transformers' model exported to ONNX, give our decoder's logits. Each is skipped without its package
(llama-cpp-python is optional; onnxruntime comes with the test extras)."""

import numpy as np
import pytest

from kvp_jax.benchmark import peers
from kvp_jax.models import decoder, gguf_checkpoint
from kvp_jax.models.config import tiny_config

from gguf_writer import Q, TinyVocab, write_gguf
from helpers import random_params


def test_llama_cpp_prefill_and_decode_match_our_logits(tmp_path):
  pytest.importorskip("llama_cpp")
  assert peers.llama_cpp_status() is None
  vocab = TinyVocab.build()
  cfg = tiny_config(vocab_size=len(vocab.tokens), bos_token_id=0, eos_token_id=(0,))
  path = tmp_path / "tiny.gguf"
  write_gguf(path, cfg, random_params(cfg, seed=3), Q.F32, tokenizer=vocab.write)
  ours_cfg, ours = gguf_checkpoint.load_gguf(path)
  tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (1, 12)).astype(np.int32)
  lc = peers.LlamaCpp(path, n_ctx=32)
  lc.prefill_call(tokens)()
  import llama_cpp  # the last evaluated token's logits (the high-level API keeps them only with logits_all)
  theirs = np.ctypeslib.as_array(llama_cpp.llama_get_logits(lc.llm.ctx), shape=(cfg.vocab_size,)).copy()
  want = np.asarray(decoder.logits(ours_cfg, ours, tokens))[0, -1]
  np.testing.assert_allclose(theirs, want, atol=2e-3, rtol=2e-3)
  step = lc.decode_call(tokens)  # prefills again, then each call appends a token
  step()
  assert lc.llm.n_tokens == 13


@pytest.mark.slow  # ~30 s: an optional peer's export; the benchmark's smoke test runs it with --onnxruntime
def test_onnxruntime_prefill_matches_our_logits(tmp_path):
  """The ONNX Runtime peer exports transformers' model of our weights (dynamic batch and length) and its
  last-position logits match our decoder's at another shape than the export's."""
  pytest.importorskip("onnxruntime")
  pytest.importorskip("onnxscript")
  from kvp_jax.models import hf_checkpoint
  assert peers.onnxruntime_status() is None
  cfg = tiny_config()
  params = random_params(cfg, seed=4)
  hf_dir = hf_checkpoint.save_pretrained(cfg, params, tmp_path / "hf")
  ort_peer = peers.OnnxRuntime(peers.Torch(hf_dir), tmp_path / "prefill.onnx")
  tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 21)).astype(np.int32)
  want = np.asarray(decoder.logits(cfg, params, tokens))[:, -1]
  np.testing.assert_allclose(ort_peer.logits(tokens), want, atol=2e-4, rtol=2e-4)
  m = ort_peer.prefill_method(tokens, cfg)
  assert m.method == "onnxruntime" and m.flops > 0 and m.extra["read_bytes"] > 0
