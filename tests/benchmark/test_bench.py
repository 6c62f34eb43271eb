"""Benchmark smoke mode end to end (tiny models, one run): valid JSON with the fields issue 5 asks for; and
the analytic FLOP counts of kvp_jax/models/flops.py against hand counts."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from kvp_jax.benchmark import methods as bm
from kvp_jax.kvp import inference
from kvp_jax.benchmark import report
from kvp_jax.kvp.flops import aux_prediction_flops, ideal_kvp_speedup, kvp_flops, kvp_read_bytes, predictor_flops
from kvp_jax.models import decoder, flops
from kvp_jax.models import params as P
from kvp_jax.models.config import ModelConfig, tiny_config

ROOT = Path(__file__).resolve().parents[2]
ROW_FIELDS = ("method", "aux", "prompt_len", "batch", "ttft_s_median", "ttft_s_min", "ttft_s_max", "flops",
              "peak_mem_bytes")


def test_prefill_flops_by_hand():
  cfg = tiny_config()  # D 64, F 128, L 2, N 4, K 2, H 16, V 256
  per_layer = 2 * (64 * (4 + 4) * 16 + 4 * 16 * 64 + 3 * 64 * 128)
  T = 10
  no_attn = T * 2 * per_layer + 2 * 64 * 256
  attn = 2 * 2 * (4 * 16) * T * (T + 1)  # 2 L d_attn T (T + 1)
  assert flops.prefill_flops(cfg, T, attention=False) == no_attn
  assert flops.prefill_flops(cfg, T) == no_attn + attn
  assert flops.prefill_flops(cfg, T, batch=3) == 3 * (no_attn + attn)


def test_decode_and_kvp_flops_compose():
  base = tiny_config(num_layers=4)
  aux = tiny_config(num_layers=1)
  T = 12
  # Decoding token T after T - 1 cached ones = the last row of a T-token prefill plus its own LM head.
  assert (flops.prefill_flops(base, T) - flops.prefill_flops(base, T - 1) + flops.lm_head_flops_per_token(base)
          == flops.decode_flops(base, T - 1))
  pred = (T - 1) * 4 * 2 * 2 * aux.kv_width * base.kv_width
  assert predictor_flops(base, aux.kv_width, T - 1) == pred
  # The aux's last layer contributes only its K/V projections (the rest feeds nothing): one layer of T-1 tokens.
  last_kv = (T - 1) * 2 * aux.hidden_size * 2 * aux.kv_width
  expect = last_kv + pred + flops.decode_flops(base, T - 1)
  assert kvp_flops(base, aux, T) == expect
  two = tiny_config(num_layers=2)
  assert (aux_prediction_flops(two, T - 1) - aux_prediction_flops(aux, T - 1)
          == flops.forward_flops(aux, T - 1, logits_positions=0))  # a full layer, attention included
  # With 2 of the base's 4 layers' width, KVP runs 1 full aux layer + K/V projections: more than 2x, under 4x.
  assert 2 < ideal_kvp_speedup(base, two, T) < 4


def test_read_bytes_by_hand():
  """The roofline's bytes: each weight once (4 bytes in float32), plus the K/V a cached step attends to."""
  cfg = tiny_config()  # D 64, F 128, L 2, N 4, K 2, H 16, V 256
  weights = 2 * (64 * (4 + 4) * 16 + 4 * 16 * 64 + 3 * 64 * 128) + 64 * 256  # layers + LM head
  assert flops.prefill_read_bytes(cfg) == 4 * weights
  assert flops.prefill_read_bytes(cfg, itemsize=2) == 2 * weights
  cache = 2 * 2 * 3 * 11 * (2 * 16) * 4  # K and V, L=2, B=3, 10 slots + the new one, K*H=32, float32
  assert flops.decode_read_bytes(cfg, 10, batch=3) == 4 * weights + cache
  aux = tiny_config(num_layers=1)
  # The one-layer aux: only its K/V projections run; the predictor: 2 layers x (K and V) of [32 -> 32].
  expect = 4 * (2 * 64 * 32 + 2 * 2 * 32 * 32) + flops.decode_read_bytes(cfg, 11)
  assert kvp_read_bytes(cfg, aux, 12) == expect


def test_rival_read_bytes_by_hand():
  """Each pass one after another reads its weights again; SwiftKV's K/V projections replace the late layers'."""
  from kvp_jax.baselines import gemfilter, specprefill, swiftkv
  cfg = tiny_config()  # D 64, F 128, L 2, N 4, K 2, H 16, V 256
  layer = 64 * (4 + 4) * 16 + 4 * 16 * 64 + 3 * 64 * 128  # q, k, v, o, MLP weights of one layer
  weights = 2 * layer + 64 * 256
  # SwiftKV at k=1: layer 0, the fused K/V of layer 1 (as big as its own k and v), layer 1's q, o and MLP, LM head.
  assert swiftkv.swiftkv_read_bytes(cfg, 1) == 4 * weights
  # GemFilter at layer 1: layer 0, layer 1's key [64 -> 32] and query [64 -> 64] projections; then every weight.
  assert gemfilter.gemfilter_read_bytes(cfg, 1) == 4 * (layer + 64 * 32 + 64 * 64) + 4 * weights
  # SpecPrefill with a 1-layer draft, 12 prompt tokens, batch 2: the draft's prefill, 7 look-ahead steps (each its
  # weights and K/V of 13..19 slots), the base's prefill.
  draft = tiny_config(num_layers=1)
  draft_w = layer + 64 * 256
  kv = sum(2 * 1 * 2 * (13 + i) * 32 * 4 for i in range(7))
  assert specprefill.specprefill_read_bytes(cfg, draft, 12, batch=2) == 4 * draft_w * 8 + kv + 4 * weights


def test_b8_over_b1_pairs_rows_by_prompt_length():
  rows = [{"method": "base", "prompt_len": 512, "batch": 1, "tpot_s_median": 0.02},
          {"method": "base", "prompt_len": 512, "batch": 8, "tpot_s_median": 0.03},
          {"method": "base", "prompt_len": 128, "batch": 8, "tpot_s_median": 0.5},  # no B=1 partner: left out
          {"method": "kvp", "prompt_len": 512, "batch": 8, "tpot_s_median": 9.0}]
  assert report._b8_over_b1(rows, "base", "tpot_s_median") == pytest.approx(1.5)
  assert report._b8_over_b1(rows, "kvp", "tpot_s_median") is None


def _xla_flops(compiled) -> float:
  ca = compiled.cost_analysis()
  return float((ca[0] if isinstance(ca, list) else ca)["flops"])


@pytest.mark.parametrize("aux", ["lp", "c", "c_activation"])
def test_analytic_flops_match_xla_cost_analysis(aux):
  """What we count is what the compiled program does: within 10% of XLA's own count (norms, RoPE and the
  softmax are XLA's, not ours). Counting the aux's unused last layer would be 70% over for KVP-LP here."""
  cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4,
                    num_kv_heads=2, head_dim=64)
  base = P.init(cfg, jax.random.PRNGKey(0))
  T = 256
  tokens, starts = jnp.zeros((1, T), jnp.int32), jnp.zeros((1,), jnp.int32)
  pre = jax.jit(decoder.prefill, static_argnums=0, static_argnames=("max_len",))
  assert _xla_flops(pre.lower(cfg, base, tokens, starts, max_len=T).compile()) == pytest.approx(
      flops.prefill_flops(cfg, T), rel=0.1)
  small = ModelConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=2,
                      num_kv_heads=2, head_dim=64)
  pair = (bm.lp_pairing(cfg, base, 0.5, jax.random.PRNGKey(1)) if aux == "lp" else
          bm.c_pairing(cfg, small, jax.random.PRNGKey(2)))
  kc, kp = pair.kcfg, pair.kp
  if aux == "c_activation":
    from kvp_jax.kvp import predictor
    kc = predictor.KVPConfig(base=cfg, aux=small, kind="activation", layer_map=kc.layer_map)
    kp = inference.KVPParams(aux=kp.aux, pred=predictor.init(kc, jax.random.PRNGKey(3), how="random"))
  compiled = inference.kvp_prefill.lower(kc, base, kp, tokens, starts, max_len=T).compile()
  assert _xla_flops(compiled) == pytest.approx(
      kvp_flops(cfg, kc.aux, T, in_width=kc.in_width, kind=kc.kind), rel=0.1)


def test_bench_smoke_writes_valid_json(tmp_path):
  out = tmp_path / "bench.json"
  cmd = [sys.executable, "-m", "kvp_jax.bench", f"--flagfile={ROOT / 'configs/bench_smoke.flags'}", f"--output={out}",
         "--onnxruntime"]
  # The timeout guards against a hang, not speed: the run took 287 s on a loaded 2-core machine.
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["matmul_peak_flops_per_s"] > 0
  for k in ("jax", "jaxlib", "xla_flags", "devices", "cpu_model"):
    assert k in res["env"], k
  rows = [r for r in res["rows"] if r["method"] != "matmul"]
  methods = {r["method"] for r in rows}
  assert {"base", "aux_only", "kvp", "kvp_recompute", "lazyllm", "random_prune", "static_prune", "swiftkv",
          "specprefill", "gemfilter"} <= methods
  rec = [r for r in rows if r["method"] == "kvp_recompute"]
  assert sorted((r["settings"]["num_intervals"], r["settings"]["interval_size"]) for r in rec) == [(1, 4), (2, 4)]
  assert {r["aux"] for r in rec} == {"lp0.5"}  # the first LP pairing
  settings = {r["method"]: r["settings"] for r in rows if r["method"] in ("lazyllm", "random_prune", "static_prune")}
  assert settings["lazyllm"]["schedule"] == "1:0.7,2:0.5"
  assert settings["random_prune"]["keep"] == settings["static_prune"]["keep"] == 0.5
  rivals = {r["method"]: r for r in rows if r["method"] in ("swiftkv", "specprefill", "gemfilter")}
  assert rivals["swiftkv"]["settings"]["cutoff"] == 0.5 and rivals["swiftkv"]["tpot_from"] == "own cache and own step"
  assert rivals["specprefill"]["aux"] == "c" and rivals["specprefill"]["settings"]["keep"] == 0.5
  assert rivals["gemfilter"]["settings"] == {"topk": 12, "layer": 1}
  for r in rows:
    if r["method"] in ("kvp_recompute", "lazyllm", "random_prune", "static_prune", "swiftkv", "specprefill",
                       "gemfilter"):
      assert r["measured_speedup"] > 0 and r["ideal_speedup"] > 0 and r["flops_no_attn"] > 0
      assert r["compile_s"] > 0
  try:
    import torch  # noqa: F401
    assert "hf_torch" in methods
    assert res["torch_matmul_peak_flops_per_s"] > 0
    torch_row = next(r for r in rows if r["method"] == "hf_torch")
    assert torch_row["tpot_s_median"] > 0 and torch_row["tpot_from"] == "dynamic cache"
    assert torch_row["ttft_over_roofline"] > 0
  except ImportError:
    pass
  if res["peers"]["onnxruntime"] is None:  # installed with the test extras
    ort_row = next(r for r in rows if r["method"] == "onnxruntime")
    assert ort_row["jax_over_onnxruntime_ttft"] > 0 and ort_row["ttft_over_roofline"] > 0
    assert res["figures"]["jax_over_onnxruntime_ttft_max_batch2"] == ort_row["jax_over_onnxruntime_ttft"]
  else:
    assert res["peers"]["onnxruntime"].startswith("not installed")
  # Roofline: FLOPs / matmul peak + bytes / read bandwidth, both measured in the row's own rounds.
  assert res["read_bandwidth_bytes_per_s"] > 0 and res["read_probe_bytes"] > 0
  mm = next(r for r in res["rows"] if r["method"] == "matmul")
  for r in rows:
    if r["method"] in ("base", "aux_only", "kvp", "kvp_recompute", "lazyllm", "random_prune", "static_prune",
                       "swiftkv", "specprefill", "gemfilter"):
      assert r["roofline_s"] == pytest.approx(
          r["flops"] / mm["achieved_flops_per_s"] + r["read_bytes"] / mm["read_bandwidth_bytes_per_s"])
      assert r["ttft_over_roofline"] == pytest.approx(r["ttft_s_median"] / r["roofline_s"])
    if r["method"] == "kvp":
      assert r["kvp_base_step_s_median"] > 0
  assert res["peers"]["llama_cpp"]  # why there is no llama.cpp row (a random base has no GGUF)
  for r in rows:
    for k in ROW_FIELDS:
      assert k in r, (k, r["method"])
    assert 0 < r["ttft_s_min"] <= r["ttft_s_median"] <= r["ttft_s_max"]
    assert r["flops"] > 0
    if r["method"] in ("aux_only", "kvp", "kvp_recompute"):
      assert r["aux"] in ("lp0.5", "c")
    if r["method"] in ("base", "kvp", "kvp_recompute", "swiftkv"):
      assert r["tpot_s_median"] > 0 and r["tpot_over_own_paired_median"] > 0
    if r["method"] == "kvp":
      assert r["tpot_over_own_paired_median"] > 0
  assert {(r["prompt_len"], r["batch"]) for r in rows} == {(24, 2)}
  assert set(res["figures"]) >= {"kvp_speedup_over_ideal_min_T_ge_512", "tpot_predicted_over_own_minus_1_max_abs",
                                 "tpot_paired_ratio_minus_1_max_abs", "base_ttft_over_roofline_max_T_ge_512",
                                 "base_tpot_b8_over_b1_max", "kvp_base_step_b8_over_b1_max"}
  assert out.with_suffix(".png").exists()


def test_bench_bad_flag_is_one_line():
  cmd = [sys.executable, "-m", "kvp_jax.bench", "--skip_groups=8y128", "--output=/dev/null"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert "error: --skip_groups entries are BATCHxPROMPT_LEN" in proc.stderr and "Traceback" not in proc.stderr
