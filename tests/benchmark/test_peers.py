"""The benchmark's llama.cpp peer runs the same model as ours: on a tiny float32 GGUF its prompt logits match
our decoder's. Skipped without llama-cpp-python (an optional benchmark peer)."""

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
