"""Shared test helpers."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from kvp_jax.data import qa_synthetic
from kvp_jax.models import params as params_lib
from kvp_jax.models.config import ModelConfig


def random_params(cfg: ModelConfig, seed: int = 0) -> params_lib.Params:
  """Random weights, with norms and biases off 1 and 0 so that a dropped or misplaced one shows.

  Drawn with numpy: eager jax.random would compile one small program per parameter shape.
  """
  rng = np.random.default_rng(seed)

  def make(spec: params_lib.ParamSpec):
    noise = rng.standard_normal(spec.shape).astype(np.float32)
    if spec.init in ("ones", "zeros"):
      return jnp.asarray((spec.init == "ones") + 0.1 * noise)
    return jnp.asarray(noise / np.sqrt(cfg.hidden_size if spec.init == "embed" else spec.fan_in))

  return params_lib.map_specs(make, params_lib.param_specs(cfg))


# SmolLM2's chat template (ChatML with a default system turn), for tiny stand-ins of an instruction-tuned base.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chat_tokenizer(vocab_size: int = 800):
  """A small byte-level BPE with SmolLM2's special tokens (ids 0 <|endoftext|>, 1 <|im_start|> = BOS,
  2 <|im_end|> = EOS and pad) and its chat template, trained on chat-format QA and a little code."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  from kvp_jax.data import code_corpus, qa_synthetic

  def render(msgs):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)

  texts = [render(c) for c in qa_synthetic.chat_conversations(60, seed=0, num_facts_range=(4, 24))]
  texts += code_corpus.code_documents("train", 10)
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                 pad_token="<|im_end|>", unk_token="<|endoftext|>", clean_up_tokenization_spaces=False,
                                 model_max_length=1 << 30)
  fast.chat_template = CHATML_TEMPLATE
  return fast


def tiny_chat_model_dir(path, num_layers: int = 4, seed: int = 0):
  """A random tiny Llama with `chat_tokenizer()`, saved as a Hugging Face directory (a stand-in for SmolLM2)."""
  from kvp_jax.models import hf_checkpoint
  from kvp_jax.models.config import tiny_config
  tok = chat_tokenizer()
  cfg = tiny_config(vocab_size=len(tok), num_layers=num_layers, max_position_embeddings=2048, bos_token_id=1,
                    eos_token_id=(2,), tie_word_embeddings=True)
  hf_checkpoint.save_pretrained(cfg, random_params(cfg, seed), path)
  tok.save_pretrained(str(path))
  return path


def qa_corpus(path, num_docs: int, num_facts_range=(4, 8)) -> Path:
  """A JSON-lines file of synthetic QA training documents (seed 0), for `--data=path`; returns the path."""
  path = Path(path)
  docs = qa_synthetic.training_documents(num_docs, seed=0, num_facts_range=num_facts_range)
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
  return path
