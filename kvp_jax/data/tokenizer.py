"""A byte-level BPE tokenizer trained with `tokenizers` and saved so `transformers.AutoTokenizer` loads it.

Byte-level means every string, any unicode included, encodes to tokens and decodes back exactly; there is
no normaliser, no unknown token and no added prefix space. Encoding adds no special tokens: the input
pipeline places <|bos|>/<|eos|> itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2 in a tokenizer trained here


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, out_dir: str | Path | None = None,
                    min_frequency: int = 2, split_digits: bool = False):
  """Trains on `texts` and returns a transformers fast tokenizer; saves it to `out_dir` when given.

  split_digits: every digit its own token. Off by default: a number is tokenized the same way in the context
  and in an answer either way (the pre-tokenizer isolates it), and whole-number tokens keep copies short.
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
    raise ValueError(f"vocab_size={vocab_size} is below the 256 byte symbols plus {len(SPECIAL_TOKENS)} specials")
  tok = Tokenizer(models.BPE())
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                       if split_digits else byte_level)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet)
  texts = list(texts)
  tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
  # clean_up_tokenization_spaces would rewrite " ." to "." on decode and break the exact round trip.
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 clean_up_tokenization_spaces=False, model_max_length=1 << 30)
  if out_dir is None:
    return fast
  fast.save_pretrained(str(out_dir))
  return load_tokenizer(out_dir)


def load_tokenizer(path_or_name: str | Path):
  """A transformers fast tokenizer from a local directory (as written by `train_tokenizer`) or a hub name."""
  from transformers import AutoTokenizer

  path = Path(path_or_name)
  looks_local = path.exists() or str(path_or_name).startswith((".", "/", "~"))
  if looks_local and not (path / "tokenizer.json").is_file():
    raise ValueError(f"no tokenizer.json in {path}: train one with kvp_jax.data.tokenizer.train_tokenizer(texts, "
                     f"vocab_size, out_dir) or pass a Hugging Face model directory")
  try:
    tok = AutoTokenizer.from_pretrained(str(path_or_name), trust_remote_code=False)
  except (OSError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"could not load tokenizer {str(path_or_name)!r} ({first}); offline, pass a local directory "
                     f"holding tokenizer.json") from None
  if not tok.is_fast:
    raise ValueError(f"{path_or_name!r} loaded a slow tokenizer; kvp_jax needs a fast one (tokenizer.json)")
  return tok
