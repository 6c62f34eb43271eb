"""kvp_jax against transformers' PyTorch models: logits, greedy generation, checkpoint round trips, errors.

Every model is a tiny, seeded, randomly initialised transformers model with ALL parameters perturbed (norm
weights off 1, biases off 0), saved to a temporary directory and loaded with `load_pretrained`.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is the reference implementation; pip install -e '.[test]'")
transformers = pytest.importorskip("transformers")

from kvp_jax.models import decoder, generation  # noqa: E402
from kvp_jax.models.hf_checkpoint import CheckpointError, load_pretrained, save_pretrained  # noqa: E402

pytestmark = pytest.mark.torch

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)
COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
# name -> (architecture, overrides): GQA groups 1 / 2 / 4, tied and untied, default and llama3 RoPE,
# head_dim != D / N, attention bias (Qwen2's q/k/v; Llama's flag also biases o_proj and is refused below).
CONFIGS = {
    "llama_mha": ("Llama", dict(num_attention_heads=4, num_key_value_heads=4)),
    "llama_gqa4_llama3rope": ("Llama", dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
                                            rope_scaling=LLAMA3_ROPE, rms_norm_eps=1e-5, num_hidden_layers=3)),
    "llama_mqa_tied_headdim24": ("Llama", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=24,
                                               tie_word_embeddings=True)),
    "qwen2_gqa2_tied": ("Qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen3_gqa2_headdim24": ("Qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                           rope_theta=1e6, tie_word_embeddings=False)),
}
NEW_TOKENS = 32
logits_jit = jax.jit(decoder.logits, static_argnums=0)


def build_hf(name: str, seed: int = 0):
  arch, overrides = CONFIGS[name]
  cfg = getattr(transformers, f"{arch}Config")(**{**COMMON, **overrides})
  torch.manual_seed(seed)
  m = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
  with torch.no_grad():
    for pname, w in m.named_parameters():  # tied weights are listed once
      if "norm" in pname:
        w.copy_(1 + 0.1 * torch.randn_like(w))
      elif pname.endswith("bias"):
        w.copy_(0.1 * torch.randn_like(w))
      else:
        w.copy_(torch.randn_like(w) / w.shape[-1] ** 0.5)
  m.generation_config.eos_token_id = None
  m.generation_config.pad_token_id = 0
  return m


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf(request, tmp_path_factory):
  """(name, transformers model, its checkpoint directory)."""
  m = build_hf(request.param)
  d = tmp_path_factory.mktemp(request.param)
  m.save_pretrained(d)
  return request.param, m, d


def hf_logits(m, tokens_BT) -> np.ndarray:
  with torch.no_grad():
    return m(torch.as_tensor(np.asarray(tokens_BT), dtype=torch.long)).logits.float().numpy()


def prompts(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 300, shape).astype(np.int32)


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def test_logits_match_transformers(hf):
  name, m, d = hf
  cfg, params = load_pretrained(d)
  toks = prompts((3, 40))
  diff = max_diff(logits_jit(cfg, params, jnp.asarray(toks)), hf_logits(m, toks))
  print(f"\n{name}: max |logit diff| vs transformers = {diff:.2e}")
  assert diff < 1e-4


def test_greedy_generation_matches_transformers(hf):
  name, m, d = hf
  cfg, params = load_pretrained(d)
  toks = prompts((2, 10), seed=1)
  with torch.no_grad():
    want = m.generate(torch.as_tensor(toks, dtype=torch.long), max_new_tokens=NEW_TOKENS,
                      min_new_tokens=NEW_TOKENS, do_sample=False).numpy()
  got = generation.generate(cfg, params, toks, NEW_TOKENS)
  np.testing.assert_array_equal(got, want)
  # A ragged batch: transformers left-pads with an attention mask, kvp_jax with per-row starts.
  ragged = [toks[0, 4:].tolist(), toks[1].tolist()]
  mask = np.array([[0] * 4 + [1] * 6, [1] * 10])
  padded = np.where(mask == 1, toks, 0)
  with torch.no_grad():
    want = m.generate(torch.as_tensor(padded, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                      max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False).numpy()
  got = generation.generate(cfg, params, ragged, NEW_TOKENS)
  assert got == [ragged[0] + want[0, 10:].tolist(), ragged[1] + want[1, 10:].tolist()]


def test_save_pretrained_round_trips_through_transformers(hf, tmp_path):
  name, m, d = hf
  cfg, params = load_pretrained(d)
  save_pretrained(cfg, params, tmp_path)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(back) is type(m)
  toks = prompts((2, 24), seed=2)
  assert max_diff(hf_logits(back, toks), hf_logits(m, toks)) < 1e-5
  cfg2, params2 = load_pretrained(tmp_path)
  assert cfg2 == cfg
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))


def test_bfloat16_load_is_close(hf):
  name, m, d = hf
  cfg, params = load_pretrained(d, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  toks = prompts((2, 24), seed=3)
  ref = hf_logits(m, toks)
  diff = max_diff(logits_jit(cfg, params, jnp.asarray(toks)), ref)
  print(f"\n{name}: bfloat16 max |logit diff| = {diff:.3f} (logits up to {np.abs(ref).max():.1f})")
  assert diff < 0.05 * np.abs(ref).max() + 0.05


# ----------------------------------------------------------------------------- one config is enough below


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  m = build_hf("llama_gqa4_llama3rope", seed=1)
  d = tmp_path_factory.mktemp("llama")
  m.save_pretrained(d)
  return m, d


def copy(src, tmp_path):
  return shutil.copytree(src, tmp_path / "ckpt")


def test_sharded_save_loads_back(llama_dir, tmp_path):
  m, d = llama_dir
  cfg, params = load_pretrained(d)
  save_pretrained(cfg, params, tmp_path, max_shard_bytes=40_000)
  shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
  assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()
  cfg2, params2 = load_pretrained(tmp_path)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)))
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  toks = prompts((1, 16), seed=4)
  assert max_diff(hf_logits(back, toks), hf_logits(m, toks)) < 1e-5


def edit_config(d, **kw):
  c = json.loads((d / "config.json").read_text())
  c.update(kw)
  (d / "config.json").write_text(json.dumps(c))


def test_unknown_architecture_is_named(llama_dir, tmp_path):
  d = copy(llama_dir[1], tmp_path)
  edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2")
  with pytest.raises(CheckpointError, match="unsupported architecture.*GPT2LMHeadModel"):
    load_pretrained(d)


def test_missing_tensor_is_named(llama_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  d = copy(llama_dir[1], tmp_path)
  tensors = load_file(str(d / "model.safetensors"))
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
    load_pretrained(d)


def test_shape_mismatch_is_named(llama_dir, tmp_path):
  d = copy(llama_dir[1], tmp_path)
  edit_config(d, intermediate_size=80)
  with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*shape"):
    load_pretrained(d)


def test_pickled_weights_are_refused(llama_dir, tmp_path):
  m, src = llama_dir
  d = copy(src, tmp_path)
  (d / "model.safetensors").unlink()
  torch.save(m.state_dict(), d / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
    load_pretrained(d)


def test_llama_attention_bias_is_refused_not_dropped(tmp_path):
  """transformers' Llama/Qwen3 attention_bias also biases o_proj, which kvp_jax lacks: refuse, never drop it."""
  arch, overrides = CONFIGS["llama_mha"]
  transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, **overrides, attention_bias=True)).save_pretrained(
      tmp_path)
  with pytest.raises(CheckpointError, match="o_proj"):
    load_pretrained(tmp_path)


def test_bias_free_qwen2_config_saves_zero_biases(tmp_path):
  from kvp_jax.models import params as params_lib
  from kvp_jax.models.config import tiny_config
  cfg = tiny_config(architecture="qwen2", vocab_size=300, num_layers=1)  # attention_bias=False
  rng = np.random.default_rng(0)  # numpy, not eager jax.random: no compile per parameter shape
  params = params_lib.map_specs(lambda s: jnp.asarray((s.init == "ones") + 0.1 * rng.standard_normal(s.shape),
                                                      jnp.float32), params_lib.param_specs(cfg))
  save_pretrained(cfg, params, tmp_path)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  toks = prompts((1, 12), seed=5)
  assert max_diff(hf_logits(back, toks), logits_jit(cfg, params, jnp.asarray(toks))) < 1e-4
