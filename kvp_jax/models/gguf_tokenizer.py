"""The tokenizer a GGUF file describes (`tokenizer.ggml.*` keys), built with `tokenizers` as a transformers fast
tokenizer, chat template included.

A GGUF carries no tokenizer.json: it stores the vocabulary, merges, token types, special ids and the name of a
pre-tokenizer (`tokenizer.ggml.pre`) whose splitting rule lives in llama.cpp's code. Byte-level BPE files
(`tokenizer.ggml.model == "gpt2"`: SmolLM, Llama 3, Qwen2/3) are rebuilt here with the split llama.cpp applies for
that name. transformers' own GGUF tokenizer does not know SmolLM's rule (digits split one by one), so on runs
of whitespace before a digit its ids differ from the model's original tokenizer and from llama.cpp; ours agree
with both.
"""

from __future__ import annotations

import numpy as np

from kvp_jax.models.gguf_checkpoint import metadata, open_gguf
from kvp_jax.models.hf_checkpoint import CheckpointError

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by the `tokenizer.ggml.pre` names that select them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2 = ("gpt-2", "gpt2", "mpt", "olmo", "jais")  # the GPT-2 regex alone
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone")  # \p{N} first
_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3")
_QWEN2 = ("qwen2", "deepseek-r1-qwen", "stablelm2")
PRE_TOKENIZERS = _GPT2 + _DIGITS_THEN_GPT2 + _LLAMA3 + _QWEN2

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _pre_tokenizer(pre: str | None):
  from tokenizers import Regex, pre_tokenizers as pt
  if pre in _GPT2:
    return pt.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGITS_THEN_GPT2:
    return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
  if pre in _LLAMA3 + _QWEN2:
    split = _LLAMA3_SPLIT if pre in _LLAMA3 else _QWEN2_SPLIT
    return pt.Sequence([pt.Split(Regex(split), behavior="isolated"),
                        pt.ByteLevel(add_prefix_space=False, use_regex=False)])
  raise CheckpointError(f"tokenizer.ggml.pre={pre!r} is not a pre-tokenizer kvp_jax knows "
                        f"(known: {', '.join(PRE_TOKENIZERS)})")


def _ints(reader, key: str) -> np.ndarray | None:
  """An integer array field, read from its parts at once (`contents()` walks 50k one-element arrays)."""
  field = reader.fields.get(key)
  if field is None:
    return None
  return np.concatenate([field.parts[i] for i in field.data]) if field.data else np.zeros(0, np.int32)


def tokenizer_from_gguf(path, *, reader=None):
  """A transformers `PreTrainedTokenizerFast` for the file's byte-level BPE vocabulary, with its chat template."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, processors
  from transformers import PreTrainedTokenizerFast
  reader = open_gguf(path) if reader is None else reader
  kind = metadata(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise CheckpointError(f"tokenizer.ggml.model={kind!r} is not supported; kvp_jax builds byte-level BPE ('gpt2') "
                          "tokenizers from GGUF (SmolLM, Llama 3, Qwen)")
  tokens = metadata(reader, "tokenizer.ggml.tokens")
  merges = metadata(reader, "tokenizer.ggml.merges")
  if not tokens or not merges:
    raise CheckpointError("the GGUF file has no tokenizer.ggml.tokens / tokenizer.ggml.merges; it holds no tokenizer")
  types = _ints(reader, "tokenizer.ggml.token_type")
  types = np.ones(len(tokens), np.int32) if types is None else types
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                             merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
  tok.pre_tokenizer = _pre_tokenizer(metadata(reader, "tokenizer.ggml.pre"))
  tok.decoder = decoders.ByteLevel()
  # Control tokens (<|im_start|>, <|endoftext|>) are matched whole and never split; user-defined ones likewise,
  # but are not special (decode keeps them).
  tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                          for i in np.flatnonzero(types == _CONTROL)])
  tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                  for i in np.flatnonzero(types == _USER_DEFINED)])

  def special(name):
    i = metadata(reader, f"tokenizer.ggml.{name}_token_id")
    return None if i is None else tokens[int(i)]

  bos = special("bos")
  if metadata(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
  else:
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
  arch = metadata(reader, "general.architecture")
  # clean_up_tokenization_spaces would rewrite " ." to "." on decode; the model never saw that.
  return PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=bos, eos_token=special("eos"), unk_token=special("unknown"),
      pad_token=special("padding"), chat_template=metadata(reader, "tokenizer.chat_template"),
      clean_up_tokenization_spaces=False, model_max_length=metadata(reader, f"{arch}.context_length", 1 << 30))
