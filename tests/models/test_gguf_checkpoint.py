"""GGUF import on small files written here with gguf.GGUFWriter the way llama.cpp lays them out.

Round trips in every quant type the loader promises, llama.cpp's q/k row permutation undone, tied and untied
heads, Qwen2 biases, Qwen3 q/k norms and head_dim != D / N, Llama-3 RoPE scaling from `rope_freqs`, a one-line
CheckpointError for each kind of bad file, and transformers' GGUF loader agreeing on the same files.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gguf_writer import Q, hf_tensors, llamacpp_permute, write_gguf
from helpers import random_params
from kvp_jax.models import decoder, gguf_checkpoint, pretrained, rope
from kvp_jax.models.config import ModelConfig, RopeScaling
from kvp_jax.models.hf_checkpoint import CheckpointError

# in-dims 256 and 512: whole blocks for every type, the 256-wide K-quant super-blocks included
LLAMA = ModelConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=128,
                    architecture="llama", bos_token_id=1, eos_token_id=(2,))
SMALL = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=64, architecture="llama")
QWEN2 = SMALL.replace(architecture="qwen2", attention_bias=True, rope_theta=1e6, tie_word_embeddings=True)
# head_dim 128 != D / N = 16: read from attention.key_length (transformers' GGUF loader takes Qwen3's default 128)
QWEN3 = SMALL.replace(architecture="qwen3", qk_norm=True, head_dim=128, rope_theta=1e6)
QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 12)).astype(np.int32)


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_unpermute_inverts_llamacpp_permute_and_is_not_the_identity():
  w = np.random.default_rng(0).standard_normal((4 * 16, 8)).astype(np.float32)
  permuted = llamacpp_permute(w, 4)
  assert not np.array_equal(permuted, w)  # otherwise the tests below could not see a missing un-permutation
  np.testing.assert_array_equal(gguf_checkpoint.unpermute_rows(permuted, 4), w)


@pytest.mark.parametrize("qtype", QTYPES)
def test_round_trip_every_quant_type(tmp_path, qtype):
  """The loaded weights equal what gguf.dequantize makes of the bytes written, un-permuted, for every type."""
  params = random_params(LLAMA, seed=1)
  expected = write_gguf(tmp_path / "m.gguf", LLAMA, params, getattr(Q, qtype))
  cfg, got = gguf_checkpoint.load_gguf(tmp_path / "m.gguf")
  assert cfg == LLAMA.replace(tie_word_embeddings=False)
  loaded = hf_tensors(cfg, got)
  assert loaded.keys() == expected.keys()
  for name, w in expected.items():
    np.testing.assert_array_equal(loaded[name], w, err_msg=name)
  if qtype == "F32":  # lossless: the very weights we started from
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
      np.testing.assert_array_equal(a, b)


def test_tied_head_and_logits_match_the_original_model(tmp_path):
  cfg0 = SMALL.replace(tie_word_embeddings=True)
  params = random_params(cfg0, seed=2)
  write_gguf(tmp_path / "m.gguf", cfg0, params)
  cfg, got = pretrained.load_pretrained(tmp_path)  # the directory holding the file
  assert cfg.tie_word_embeddings and got.lm_head is None
  assert max_diff(decoder.logits(cfg, got, TOKENS), decoder.logits(cfg0, params, TOKENS)) == 0.0


@pytest.mark.parametrize("cfg0", [QWEN2, QWEN3], ids=["qwen2_bias", "qwen3_qknorm_headdim128"])
def test_qwen_round_trip(tmp_path, cfg0):
  """Qwen files are written without llama.cpp's permutation; biases and q/k norms land in their fields."""
  params = random_params(cfg0, seed=3)
  write_gguf(tmp_path / "m.gguf", cfg0, params)
  cfg, got = gguf_checkpoint.load_gguf(tmp_path / "m.gguf")
  assert cfg == cfg0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert max_diff(decoder.logits(cfg, got, TOKENS), decoder.logits(cfg0, params, TOKENS)) == 0.0


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
  scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
  cfg0 = SMALL.replace(rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072)
  divisors = rope.inv_frequencies(cfg0.replace(rope_scaling=None)) / rope.inv_frequencies(cfg0)
  assert len(set(np.round(divisors, 4))) > 2  # unscaled, scaled and smoothed frequencies all occur
  write_gguf(tmp_path / "m.gguf", cfg0, random_params(cfg0), rope_freqs=divisors)
  assert gguf_checkpoint.load_gguf(tmp_path / "m.gguf")[0].rope_scaling == scaling
  write_gguf(tmp_path / "bad.gguf", cfg0, random_params(cfg0), rope_freqs=divisors ** 0.5)
  with pytest.raises(CheckpointError, match="rope_freqs.weight holds frequency factors other than Llama-3"):
    gguf_checkpoint.load_gguf(tmp_path / "bad.gguf")


def one_line_error(path, match):
  with pytest.raises(CheckpointError, match=match) as e:
    gguf_checkpoint.load_gguf(path)
  assert "\n" not in str(e.value)


def test_errors_are_one_line(tmp_path):
  params = random_params(SMALL)
  write_gguf(tmp_path / "gemma.gguf", SMALL, params, arch="gemma2")
  one_line_error(tmp_path / "gemma.gguf", r"unsupported GGUF architecture 'gemma2'; kvp_jax loads llama, qwen2, "
                                          "qwen3")
  write_gguf(tmp_path / "missing.gguf", SMALL, params, drop=("blk.1.ffn_up.weight",))
  one_line_error(tmp_path / "missing.gguf", r"tensor 'blk.1.ffn_up.weight' missing from the llama GGUF file")
  bias = {"blk.0.attn_q.bias": np.zeros(64, np.float32)}  # a Llama with q bias: not our model
  write_gguf(tmp_path / "extra.gguf", SMALL, params, extra=bias)
  one_line_error(tmp_path / "extra.gguf", r"tensor 'blk.0.attn_q.bias' \(1 unexpected in all\) has no place")
  write_gguf(tmp_path / "q81.gguf", SMALL, params, Q.Q8_1)
  one_line_error(tmp_path / "q81.gguf", r"tensor '.*' is stored as Q8_1, which gguf .* cannot dequantize")
  (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04 a zip, not a GGUF" * 10)
  one_line_error(tmp_path / "not.gguf", r"cannot read .*not.gguf as GGUF .*truncated, damaged or not a GGUF")


@pytest.mark.parametrize("keep", [0.6, 0.02])
def test_truncated_file(tmp_path, keep):
  """Cut in the tensor data or in the metadata: a one-line error, never a crash or silently short weights."""
  write_gguf(tmp_path / "m.gguf", SMALL, random_params(SMALL))
  data = (tmp_path / "m.gguf").read_bytes()
  (tmp_path / "cut.gguf").write_bytes(data[:int(len(data) * keep)])
  one_line_error(tmp_path / "cut.gguf", r"cannot read .*cut.gguf as GGUF .*truncated")


def test_find_gguf(tmp_path):
  assert gguf_checkpoint.find_gguf(tmp_path) is None
  write_gguf(tmp_path / "a.gguf", SMALL, random_params(SMALL))
  assert gguf_checkpoint.find_gguf(tmp_path) == tmp_path / "a.gguf"
  write_gguf(tmp_path / "b.gguf", SMALL, random_params(SMALL))
  with pytest.raises(CheckpointError, match="holds 2 GGUF files"):
    pretrained.load_pretrained(tmp_path)


@pytest.mark.torch
@pytest.mark.parametrize("cfg0,qtype", [(LLAMA, "Q4_K"), (QWEN2, "F32"), (QWEN3, "Q8_0")],
                         ids=["llama_q4k", "qwen2_f32", "qwen3_q8"])
def test_transformers_reads_the_same_gguf_the_same_way(tmp_path, cfg0, qtype):
  """transformers' own GGUF loader (its q/k de-permutation, its name map) gives the logits we give."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
  write_gguf(tmp_path / "m.gguf", cfg0, random_params(cfg0, seed=5), getattr(Q, qtype))
  cfg, params = gguf_checkpoint.load_gguf(tmp_path / "m.gguf")
  m = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
  with torch.no_grad():
    ref = m(torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy()
  assert max_diff(decoder.logits(cfg, params, jnp.asarray(TOKENS)), ref) <= 1e-5 * max(1.0, np.abs(ref).max())
