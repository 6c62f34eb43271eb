"""Writes small GGUF files the way llama.cpp's convert_hf_to_gguf.py lays them out, for the GGUF tests.

Independent of the reader under test: the q/k row permutation here is llama.cpp's forward `permute`, and the
expected weights are what `gguf.dequantize` makes of the exact bytes written.
"""

import dataclasses
import json

import gguf
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kvp_jax.models import hf_checkpoint
from kvp_jax.models.config import ModelConfig

Q = gguf.GGMLQuantizationType
# the types gguf-py can quantize; the K types are written as random blocks with sane scales instead
QUANTIZABLE = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
# byte offset of each K type's float16 super-block scale(s), which random bytes must not make inf/nan
_K_SCALES = {Q.Q4_K: (0, 2), Q.Q6_K: (208,), Q.Q5_K: (0, 2), Q.Q2_K: (80, 82), Q.Q3_K: (108,)}

# Params field -> llama.cpp tensor name inside block N
LAYER_NAMES = {
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
    "wo": "attn_output.weight", "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
    "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight", "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
}


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's LlamaModel.permute: each head's rows go from (2, H/2) halves to interleaved pairs."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensors(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
  """GGUF name -> float32 weight in torch layout [out, in], before llama.cpp's permutation."""
  out = {"token_embd.weight": np.asarray(params.embed, np.float32),
         "output_norm.weight": np.asarray(params.final_norm, np.float32)}
  if params.lm_head is not None:
    out["output.weight"] = np.asarray(params.lm_head, np.float32).T
  for i, lp in enumerate(params.layers):
    for field, name in LAYER_NAMES.items():
      w = getattr(lp, field)
      if w is not None:
        out[f"blk.{i}.{name}"] = np.ascontiguousarray(hf_checkpoint._to_hf(field, np.asarray(w, np.float32)))
  return out


def encode(w: np.ndarray, qtype, rng) -> np.ndarray:
  """The bytes (or float16/float32 values) a tensor is stored as: quantized from w, or random K blocks."""
  if qtype == Q.F32:
    return w.astype(np.float32)
  if qtype in QUANTIZABLE:
    return gguf.quantize(w, qtype)
  block, size = gguf.GGML_QUANT_SIZES[qtype]
  raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
  for off in _K_SCALES.get(qtype, ()):
    raw[..., off:off + 2] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
  return raw.reshape(w.shape[0], -1)


def decode(raw: np.ndarray, qtype) -> np.ndarray | None:
  """What gguf makes of the stored bytes; None for a type it cannot unpack (the loader must refuse those)."""
  try:
    return np.asarray(gguf.dequantize(raw, qtype), np.float32)
  except NotImplementedError:
    return None


def quantizes(name: str, w: np.ndarray, qtype) -> bool:
  """llama.cpp keeps 1-D tensors (norms, biases) in F32, and a row must hold whole blocks."""
  return w.ndim == 2 and w.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0] == 0


def write_gguf(path, cfg: ModelConfig, params, qtype=Q.F32, *, arch=None, drop=(), extra=None, tokenizer=None,
               seed=0, rope_freqs=None) -> dict[str, np.ndarray]:
  """Writes (cfg, params) as llama.cpp would; returns GGUF name -> the float32 torch-layout weight a correct
  reader must recover (the dequantized bytes, un-permuted)."""
  arch = arch or cfg.architecture
  rng = np.random.default_rng(seed)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.num_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
  w.add_rope_dimension_count(cfg.head_dim)
  if cfg.bos_token_id is not None:
    w.add_bos_token_id(cfg.bos_token_id)
  if cfg.eos_token_id:
    w.add_eos_token_id(cfg.eos_token_id[0])
  if tokenizer is not None:
    tokenizer(w)
  expected = {}
  tensors = hf_tensors(cfg, params)
  if rope_freqs is not None:
    tensors["rope_freqs.weight"] = np.asarray(rope_freqs, np.float32)
  for name, x in {**tensors, **(extra or {})}.items():
    if name in drop:
      continue
    q = qtype if quantizes(name, x, qtype) else Q.F32
    raw = encode(x, q, rng)
    value = decode(raw, q)
    expected[name] = None if value is None else value.reshape(x.shape)
    if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
      raw = llamacpp_permute(raw, cfg.num_heads if "attn_q" in name else cfg.num_kv_heads)
    w.add_tensor(name, raw, raw_dtype=None if q in (Q.F32, Q.F16) else q)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return expected


# ----------------------------------------------------------------------------- tokenizer

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["def add(a, b):\n    return a + b  # 12 + 345\n", "Nora Webb lives in room 7890.",
          "The quick brown fox jumps over the lazy dog 42 times.", "x = [1, 2,   34]\n\ty = 99"] * 4


def declared_pre_tokenizer(pre: str):
  """What the original models' tokenizer.json files declare for these llama.cpp pre-tokenizer names."""
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  return byte_level


@dataclasses.dataclass
class TinyVocab:
  tokens: list
  merges: list
  pre: str
  reference: Tokenizer

  @classmethod
  def build(cls, pre: str = "smollm", vocab_size: int = 300) -> "TinyVocab":
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = declared_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    return cls(tokens, merges, pre, tok)

  def write(self, w):
    """Adds the tokenizer keys to a gguf.GGUFWriter (bos/eos come from the model config)."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(self.pre)
    w.add_token_list(self.tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in self.tokens])
    w.add_token_merges(self.merges)
    w.add_pad_token_id(2)
    w.add_chat_template(CHATML)
