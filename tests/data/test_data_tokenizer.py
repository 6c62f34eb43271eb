"""Tests for kvp_jax.data.tokenizer: byte-level round trips and loading through transformers.AutoTokenizer."""

import json

import pytest

from kvp_jax.data import code_corpus, qa_synthetic
from kvp_jax.data import tokenizer as tokenizer_lib

UNICODE_CODE = "def grüß(x: str) -> str:\n\t# ☃ 日本語 émoji 🚀\n    return f'{x!r}  ' + \"\\u00e9\"\r\n\n"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok")
  texts = code_corpus.code_documents("train", max_files=4) + qa_synthetic.training_documents(10, seed=0)
  tok = tokenizer_lib.train_tokenizer(texts, vocab_size=320, out_dir=out)
  return tok, out


def test_saved_files_name_the_special_tokens(saved):
  _, out = saved
  config = json.loads((out / "tokenizer_config.json").read_text())
  assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|bos|>", "<|eos|>", "<|pad|>")
  assert (out / "tokenizer.json").is_file()


def test_auto_tokenizer_loads_it_offline(saved, monkeypatch):
  from huggingface_hub import constants
  from transformers import AutoTokenizer
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  tok, out = saved
  auto = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)
  assert auto.is_fast
  assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (0, 1, 2)
  assert 256 + 3 < len(auto) <= 320
  assert auto.encode(UNICODE_CODE) == tok.encode(UNICODE_CODE)


@pytest.mark.parametrize("text", [UNICODE_CODE, "", " leading space", "x <|eos|> y", "\x00\x7f\u200b"])
def test_decode_encode_round_trips(saved, text):
  tok, _ = saved
  ids = tok.encode(text, add_special_tokens=False)
  assert tok.decode(ids) == text


def test_round_trip_on_held_out_code_and_no_special_tokens_added(saved):
  tok, _ = saved
  text = code_corpus.code_documents("test", max_files=1)[0]
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert not {0, 1, 2} & set(ids)
  assert len(ids) < len(text.encode("utf-8"))  # merges were learned


def test_load_errors_are_one_line_and_say_what_to_do(tmp_path):
  with pytest.raises(ValueError, match="no tokenizer.json") as e:
    tokenizer_lib.load_tokenizer(tmp_path)
  assert "\n" not in str(e.value) and "train_tokenizer" in str(e.value)
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer_lib.train_tokenizer(["abc"], vocab_size=100)
