"""What a user would otherwise run, timed in the same rounds as our calls, on the same weights: transformers +
PyTorch (float32, `inference_mode`, SDPA attention) for prefill and decode, torch's own GEMM peak; ONNX Runtime
(CPU execution provider) on transformers' model exported to ONNX by `torch.onnx.export`, for prefill; and
llama.cpp on the original GGUF file (its own quantized kernels) through the optional `llama-cpp-python` package.
None is a kvp_jax dependency: each is imported here only, and a missing one leaves its rows out with the reason
recorded.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable

import numpy as np

from kvp_jax.benchmark.methods import Method
from kvp_jax.models import flops
from kvp_jax.models.config import ModelConfig


def _missing(modules: tuple[str, ...], pip: str) -> str | None:
  """None when every module imports, else why the peer's rows are absent (and what installs them)."""
  try:
    for m in modules:
      importlib.import_module(m)
  except ImportError as e:
    return f"not installed (pip install {pip}; {e.__class__.__name__}: {e})"
  return None


def _usable_cores() -> int:
  """The cores this process may run on: what our XLA calls get, so every peer gets as many threads."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def torch_matmul_call(n: int):
  """The same n x n x n float32 matmul in PyTorch (same FLOPs as matmul_call's): the peer's GEMM roofline."""
  import torch
  g = torch.Generator().manual_seed(1)
  a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
  return lambda: torch.matmul(a, b)


class Torch:
  """transformers' model of the same weights, loaded once per benchmark run from a Hugging Face directory."""

  def __init__(self, hf_dir):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.utils.logging.disable_progress_bar()
    self.hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                   attn_implementation="sdpa").eval()

  def prefill_method(self, tokens: np.ndarray, base_cfg: ModelConfig) -> Method:
    """The prefill (LM head at the last position only), counted like our base's."""
    import torch
    ids = torch.from_numpy(np.asarray(tokens, np.int64))

    def call():
      with torch.inference_mode():
        return self.hf(input_ids=ids, use_cache=True, logits_to_keep=1).logits

    B, T = tokens.shape
    return Method("hf_torch", None, call, None, flops.prefill_flops(base_cfg, T, batch=B),
                  flops.prefill_flops(base_cfg, T, batch=B, attention=False), None,
                  {"read_bytes": flops.prefill_read_bytes(base_cfg)})

  def decode_call(self, tokens: np.ndarray) -> Callable[[], Any]:
    """A decode step per call on transformers' default (dynamic) cache, prefilled once with `tokens`.

    Each call appends one token, as `generate` does, so the cache grows by a slot per call (the caller keeps
    the number of calls within the slots our own TPOT decodes into).
    """
    import torch
    ids = torch.from_numpy(np.asarray(tokens, np.int64))
    with torch.inference_mode():
      cache = self.hf(input_ids=ids, use_cache=True, logits_to_keep=1).cache
    nxt = torch.zeros((ids.shape[0], 1), dtype=torch.int64)

    def call():
      with torch.inference_mode():
        return self.hf(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=1).logits
    return call


def onnxruntime_status() -> str | None:
  """None when ONNX Runtime and the exporter's packages import, else why its rows are absent."""
  return _missing(("onnx", "onnxruntime", "onnxscript", "torch"), "onnxruntime onnx onnxscript")


class OnnxRuntime:
  """transformers' model of the same weights as an ONNX prefill graph (ids [B, T] -> logits of the last position,
  no cache: the TTFT question), exported once per benchmark run with dynamic B and T, run by ONNX Runtime's CPU
  execution provider with every usable core and its full graph optimisations (its default)."""

  def __init__(self, torch_peer: "Torch", onnx_path):
    import onnxruntime as ort
    import torch
    import transformers

    class Prefill(torch.nn.Module):
      def __init__(self, hf):
        super().__init__()
        self.hf = hf

      def forward(self, ids):
        return self.hf(input_ids=ids, use_cache=False, logits_to_keep=1).logits

    ids = torch.zeros((2, 16), dtype=torch.int64)
    dims = ({0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("tokens", min=2, max=1 << 16)},)
    transformers.utils.logging.set_verbosity_error()
    program = torch.onnx.export(Prefill(torch_peer.hf).eval(), (ids,), dynamo=True, dynamic_shapes=dims,
                                input_names=["ids"], output_names=["logits"], verbose=False)
    program.save(str(onnx_path))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _usable_cores()
    self.session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    self.version = ort.__version__

  def logits(self, tokens: np.ndarray) -> np.ndarray:
    """[B, V] logits of the last position."""
    return self.session.run(None, {"ids": np.asarray(tokens, np.int64)})[0][:, -1]

  def prefill_method(self, tokens: np.ndarray, base_cfg: ModelConfig) -> Method:
    ids = np.asarray(tokens, np.int64)
    B, T = ids.shape
    return Method("onnxruntime", None, lambda: self.session.run(None, {"ids": ids}), None,
                  flops.prefill_flops(base_cfg, T, batch=B), flops.prefill_flops(base_cfg, T, batch=B, attention=False),
                  None, {"read_bytes": flops.prefill_read_bytes(base_cfg), "onnxruntime": self.version})


def llama_cpp_status() -> str | None:
  """None when llama-cpp-python imports, else why its rows are absent."""
  return _missing(("llama_cpp",), "llama-cpp-python")


class LlamaCpp:
  """llama.cpp on a GGUF file, one sequence (llama-cpp-python's `Llama` runs one): prefill and decode calls.

  Threads: every usable core, for prompt and generation alike (what our XLA calls get).
  """

  def __init__(self, gguf_path, n_ctx: int):
    import llama_cpp
    threads = _usable_cores()
    self.llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_batch=min(n_ctx, 2048),
                               n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
    self.version = getattr(llama_cpp, "__version__", None)

  def prefill_call(self, tokens_1T: np.ndarray) -> Callable[[], Any]:
    """Clears the context and evaluates the prompt (logits of its last token)."""
    ids = [int(t) for t in np.asarray(tokens_1T).reshape(-1)]

    def call():
      self.llm.reset()
      self.llm.eval(ids)
    return call

  def decode_call(self, tokens_1T: np.ndarray) -> Callable[[], Any]:
    """Evaluates the prompt once; each call then appends one token."""
    self.prefill_call(tokens_1T)()
    return lambda: self.llm.eval([0])
