"""KV-Runahead: the chain over 2, 4 and 8 simulated devices (in a subprocess) gives the single-device prefill's
logits and cache, uneven chunks and left padding included, and so does KV Prediction with its aux prefill run
that way; the cost model's critical path and chunk balancing behave as the schedule says."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvp_jax.baselines import runahead, runahead_cost
from kvp_jax.models.config import tiny_config

TESTS = Path(__file__).resolve().parents[1]

CHAIN = textwrap.dedent("""
  import os
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  import jax, jax.numpy as jnp, numpy as np
  from helpers import random_params
  from kvp_jax.baselines import runahead
  from kvp_jax.kvp import aux_models, inference
  from kvp_jax.models import decoder
  from kvp_jax.models.config import tiny_config
  from kvp_jax.training import sharding

  cfg = tiny_config(num_layers=2, qk_norm=True)  # key norm: the cache must hold keys after it and RoPE
  params = random_params(cfg, 0)
  B, T, max_len = 2, 23, 32
  toks = jax.random.randint(jax.random.PRNGKey(1), (B, T), 0, cfg.vocab_size)
  starts = jnp.array([0, 3], jnp.int32)  # row 1 is left-padded
  ref_logits, ref = decoder.prefill(cfg, params, toks, starts, max_len)
  real = np.asarray((ref.slot_positions() >= 0) & (jnp.arange(max_len) < T))[None, :, None, :, None]
  kcfg, kp = inference.build(cfg, params, aux_models.AuxSpec(kind="lp", lp_keep_fraction=0.5), init="random")
  kvp_ref, kvp_cache = inference.kvp_prefill(kcfg, params, kp, toks, starts, max_len)
  for chunks in CHUNKS:
    p = len(chunks)
    mesh = sharding.make_mesh(data=1, seq=p)
    compiled = runahead.runahead_prefill.lower(cfg, params, toks, starts, max_len, mesh=mesh, chunks=chunks).compile()
    logits, cache = compiled(params, toks, starts)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for got, want in ((cache.k, ref.k), (cache.v, ref.v)):  # padding slots hold unspecified values in both
      np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-5, rtol=1e-5)
    assert int(cache.end) == T and cache.k.shape == ref.k.shape
    # the chain really is point to point: p - 1 rounds of 2 collective-permutes per layer, no all-gather
    hlo = compiled.as_text()
    assert hlo.count("collective-permute-start") + hlo.count("collective-permute(") >= 2 * (p - 1) * cfg.num_layers
    assert "all-gather" not in hlo
    if p == 4:  # KV Prediction with the aux prefill (T - 1 tokens) run as a chain
      method = runahead.kvp_runahead_method(kcfg, params, kp, "lp", mesh)  # even chunks of the T - 1 aux tokens
      lg, c = method.prefill(toks, starts, max_len)
      np.testing.assert_allclose(lg, kvp_ref, atol=1e-5, rtol=1e-5)
      np.testing.assert_allclose(np.where(real, c.k, 0), np.where(real, kvp_cache.k, 0), atol=1e-5, rtol=1e-5)
      # the bench that times one device, tensor parallelism and the chain on p devices runs every variant
      from kvp_jax.benchmark import runahead as bench
      t = bench.measure_prefills(cfg, params, T, p, {"even": runahead.even_chunks(T, p), "uneven": chunks}, runs=1)
      assert set(t) == {"one device", "tensor parallel", "runahead, even", "runahead, uneven"}, t
      assert all(v > 0 for v in t.values()), t
    print("OK", chunks)
""")


def _chain(chunks):
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
         "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", f"CHUNKS = {chunks!r}\n" + CHAIN], capture_output=True, text=True,
                     timeout=900, env=env)
  assert r.returncode == 0 and r.stdout.count("OK") == len(chunks), r.stdout[-2000:] + r.stderr[-4000:]


def test_chain_on_4_devices_equals_single_device_prefill():
  _chain([(8, 6, 5, 4)])  # uneven chunks, and KV Prediction's aux prefill as a chain


@pytest.mark.slow
def test_chain_on_2_4_8_devices_equals_single_device_prefill():
  _chain([(13, 10), (8, 6, 5, 4), (4, 3, 3, 3, 3, 3, 2, 2)])


def test_chunks_are_checked():
  assert runahead.even_chunks(10, 4) == (3, 3, 2, 2)
  with pytest.raises(ValueError, match="summing to the prompt length 10"):
    runahead.check_chunks((5, 4), 10, 2)
  with pytest.raises(ValueError, match="cannot cut 3 prompt tokens into 4"):
    runahead.even_chunks(3, 4)


def test_cost_fit_recovers_its_coefficients():
  true = runahead_cost.ChunkCost(2e-4, 3e-6, 1e-9)
  pts = [(n, ctx, true(n, ctx)) for n in (64, 256, 1024) for ctx in (n, 2048, 4096) if ctx >= n]
  got = runahead_cost.fit(pts)
  for a, b in ((got.a, true.a), (got.b, true.b), (got.c, true.c)):
    assert a == pytest.approx(b, rel=1e-6)


def test_critical_path_of_one_device_and_of_a_free_link():
  cost = runahead_cost.ChunkCost(1e-4, 2e-6, 1e-9)
  cfg = tiny_config()
  share = runahead_cost.qkv_share(cfg)
  free = runahead_cost.Link(bandwidth=float("inf"))
  # one device: every layer is the whole prompt
  assert runahead_cost.runahead_time([512], 4, cost, free, 64, share) == pytest.approx(4 * cost(512, 512))
  # a free link: a slower last device never waits (it takes its own work), a faster one waits every layer for
  # the first device's projections and then does the rest of its layer
  assert runahead_cost.runahead_time([212, 300], 4, cost, free, 64, share) == pytest.approx(4 * cost(300, 512))
  t = runahead_cost.runahead_time([300, 212], 4, cost, free, 64, share)
  assert cost(300, 300) > cost(212, 512)
  waits = 3 * cost(300, 300) + share * cost.linear(300) + (1 - share) * cost.linear(212) + cost.c * 212 * 512
  assert t == pytest.approx(waits)
  # a slow link only ever adds time
  slow = runahead_cost.Link(bandwidth=1e3, latency=1e-3)
  assert runahead_cost.runahead_time([300, 212], 4, cost, slow, 64, share) > t


def test_balanced_chunks_are_shorter_late_and_never_slower_than_even():
  cfg = tiny_config(num_layers=8)
  cost = runahead_cost.ChunkCost(1e-4, 2e-6, 4e-9)  # attention-heavy: chunk balancing matters
  rows = runahead_cost.plan_table(cfg, cost, 2048, [2, 4, 8], runahead_cost.Link(1e9, 1e-6))
  for r in rows:
    assert sum(r["chunks"]) == 2048 and len(r["chunks"]) == r["p"]
    assert r["runahead_balanced"] <= r["runahead_even"] * (1 + 1e-9)
    assert r["chunks"][-1] < r["chunks"][0]  # later chunks attend to more keys, so they are shorter
  assert rows[-1]["runahead_balanced"] < rows[0]["runahead_balanced"]  # more devices, shorter prefill
