"""The tokenizer rebuilt from a GGUF's tokenizer.ggml.* keys, on tiny vocabularies trained here.

The reference for each `tokenizer.ggml.pre` name is the pipeline the original model's tokenizer.json declares
(SmolLM: digits split one by one, then GPT-2's byte-level regex), run by `tokenizers` on the same vocabulary.
"""

import pytest

from gguf_writer import CHATML, TinyVocab, write_gguf
from helpers import random_params
from kvp_jax.models import gguf_tokenizer
from kvp_jax.models.config import ModelConfig
from kvp_jax.models.hf_checkpoint import CheckpointError

TEXTS = ["Hello world", "room 7890.", "x = [\n    1, 2,   34]\n\tdef f():  99", "a  7", "  lead  12 and    345",
         "émoji 🤖 ünïcode", "<|im_start|>user\nhi<|im_end|>", "tail space "]


def tiny_file(tmp_path, pre="smollm", name="m.gguf"):
  vocab = TinyVocab.build(pre)
  cfg = ModelConfig(vocab_size=len(vocab.tokens), hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=16, architecture="llama", bos_token_id=1, eos_token_id=(2,))
  write_gguf(tmp_path / name, cfg, random_params(cfg), tokenizer=vocab.write)
  return tmp_path / name, vocab


@pytest.mark.parametrize("pre", ["smollm", "gpt-2"])
def test_ids_match_the_declared_pipeline_and_decode_back(tmp_path, pre):
  path, vocab = tiny_file(tmp_path, pre)
  tok = gguf_tokenizer.tokenizer_from_gguf(path)
  for text in TEXTS:
    ids = tok(text)["input_ids"]
    assert ids == vocab.reference.encode(text).ids, text
    assert tok.decode(ids) == text
  assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


def test_smollm_digits_are_split_even_after_a_run_of_spaces(tmp_path):
  """SmolLM's rule, which transformers' GGUF tokenizer lacks: 'a  7' is 'a' + '  ' + '7', not 'a' + ' ' + ' 7'."""
  path, vocab = tiny_file(tmp_path)
  assert "ĠĠ" in vocab.tokens  # else both rules would give the same pieces
  tok = gguf_tokenizer.tokenizer_from_gguf(path)
  assert tok.convert_ids_to_tokens(tok("a  7")["input_ids"]) == ["a", "ĠĠ", "7"]
  assert tok.convert_ids_to_tokens(tok("x 12")["input_ids"]) == ["x", "Ġ", "1", "2"]


def test_special_tokens_and_chat_template(tmp_path):
  path, vocab = tiny_file(tmp_path)
  tok = gguf_tokenizer.tokenizer_from_gguf(path)
  ids = tok("<|im_start|>user\nhi 12<|im_end|>")["input_ids"]
  assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
  msgs = [{"role": "user", "content": "Where does Nora Webb live? 7890"}]
  text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
  assert text == "<|im_start|>user\nWhere does Nora Webb live? 7890<|im_end|>\n<|im_start|>assistant\n"
  ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
  assert ids == vocab.reference.encode(text).ids


def test_saved_tokenizer_loads_in_transformers(tmp_path):
  from transformers import AutoTokenizer
  path, _ = tiny_file(tmp_path)
  tok = gguf_tokenizer.tokenizer_from_gguf(path)
  tok.save_pretrained(str(tmp_path / "tok"))
  again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  for text in TEXTS:
    assert again(text)["input_ids"] == tok(text)["input_ids"]
  assert again.chat_template == CHATML and again.eos_token == "<|im_end|>"


def test_unsupported_tokenizers_are_one_line_errors(tmp_path):
  path, _ = tiny_file(tmp_path, pre="no-such-rule")
  with pytest.raises(CheckpointError, match=r"tokenizer.ggml.pre='no-such-rule' is not a pre-tokenizer kvp_jax knows"):
    gguf_tokenizer.tokenizer_from_gguf(path)
  cfg = ModelConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=16)
  write_gguf(tmp_path / "spm.gguf", cfg, random_params(cfg), tokenizer=lambda w: w.add_tokenizer_model("llama"))
  with pytest.raises(CheckpointError, match=r"tokenizer.ggml.model='llama' is not supported"):
    gguf_tokenizer.tokenizer_from_gguf(tmp_path / "spm.gguf")


@pytest.mark.torch
@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_llama3_and_qwen2_splits_match_transformers_gguf_tokenizer(tmp_path, pre):
  """transformers reads these two rules from GGUF too (it needs torch for that): the same ids on every text."""
  pytest.importorskip("torch")
  from transformers import AutoTokenizer
  path, _ = tiny_file(tmp_path, pre)
  ours = gguf_tokenizer.tokenizer_from_gguf(path)
  theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  for text in TEXTS:
    assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
