"""What a user would otherwise run, timed in the same rounds as our calls: transformers + PyTorch on the same
weights (torch is a benchmark reference only; kvp_jax never imports it at run time), and torch's own GEMM peak.
"""

from __future__ import annotations

import numpy as np

from kvp_jax.benchmark.methods import Method
from kvp_jax.models import flops
from kvp_jax.models.config import ModelConfig


def torch_matmul_call(n: int):
  """The same n x n x n float32 matmul in PyTorch (same FLOPs as matmul_call's): the peer's GEMM roofline."""
  import torch
  g = torch.Generator().manual_seed(1)
  a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
  return lambda: torch.matmul(a, b)


def torch_prefill_method(hf_dir, tokens: np.ndarray, base_cfg: ModelConfig) -> Method:
  """transformers' PyTorch prefill of the same weights (SDPA attention, LM head at the last position only)."""
  import torch
  import transformers
  from transformers import AutoModelForCausalLM
  transformers.utils.logging.disable_progress_bar()
  hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
  ids = torch.from_numpy(np.asarray(tokens, np.int64))

  def call():
    with torch.inference_mode():
      return hf(input_ids=ids, use_cache=True, logits_to_keep=1).logits

  B, T = tokens.shape
  return Method("hf_torch", None, call, None, flops.prefill_flops(base_cfg, T, batch=B),
                flops.prefill_flops(base_cfg, T, batch=B, attention=False), None)
