"""The quickstart's smoke presets end to end (every stage, then eval) and their reruns reusing every stage: the tiny
path (a base trained here) and the real-base path (smollm2-smoke on a tiny random Llama with a chat template); the
plans with ablations. Run as a subprocess: it is the command CI and users type."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_chat_model_dir

ROOT = Path(__file__).resolve().parents[1]


def _quickstart(workdir, *extra, preset="smoke", ok=True):
  cmd = [sys.executable, "-m", "kvp_jax.quickstart", f"--workdir={workdir}", f"--preset={preset}", *extra]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  if not ok:
    return proc
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


# Slow (~2 min): the from-scratch path (base, KVP-C aux, every trained stage); the default suite trains each stage in
# tests/training/ and runs the default preset's path end to end, with its rerun, below.
@pytest.mark.slow
def test_smoke_preset_end_to_end_then_reuses_every_stage(tmp_path):
  out = _quickstart(tmp_path)
  report = json.loads((tmp_path / "eval" / "report.json").read_text())
  assert report["tasks"] == ["qa_em", "qa_2hop_em", "code_line_em", "code_token_acc"]
  rows = report["results"]
  assert {(r["method"], r.get("aux")) for r in rows} == {
      ("base", None), ("aux_only", "c"), ("lp_alone", "lp0.50"), ("kvp", "c"), ("kvp", "lp0.50"),
      ("kvp_recompute", "lp0.50"), ("lazyllm", None), ("random_prune", None), ("static_prune", None),
      ("swiftkv", None), ("specprefill", "c"), ("gemfilter", None)}
  base = next(r for r in rows if r["method"] == "base")
  assert "aux" not in base
  for r in rows:
    assert set(r["metrics"]) == set(report["tasks"])
    assert all(0.0 <= v <= 1.0 for v in r["metrics"].values()), r
    assert r["ttft_flops"] > 0 and r["ttft_flops_paper"] > 0
    if r["method"] in ("kvp", "aux_only", "lp_alone"):
      assert r["ttft_flops"] < base["ttft_flops"], r["label"]
      assert all(r["ttft_flops_by_task"][t] < base["ttft_flops_by_task"][t] for t in r["ttft_flops_by_task"])
  assert set(report["gap_recovered"]) == {"c", "lp0.50"}
  assert set(report["kv_error"]) == {"kvp[c]", "kvp[lp0.50]"}
  assert len(report["kv_error"]["kvp[c]"]["k"]) == 2  # one value per base layer
  for f in ("report.md", "pareto.png", "kv_error.png"):
    assert (tmp_path / "eval" / f).stat().st_size > 0
  assert "| kvp | lp0.50 |" in out and "pareto.png" in out
  assert (tmp_path / "eval.flags").exists()

  again = _quickstart(tmp_path)
  assert again.count("reused") == 7, again  # six training stages (SwiftKV's among them) and the evaluation


def _plan_json(code: str, timeout: int = 120):
  """What a snippet of quickstart planning prints as JSON, run in a fresh interpreter (absl flags stay unparsed)."""
  proc = subprocess.run([sys.executable, "-c", "from kvp_jax import quickstart as q; from pathlib import Path; "
                         "import json; " + code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout)


def test_plan_with_ablations_adds_three_kvp_variants_of_one_aux():
  names, specs = _plan_json("p = q.PRESETS['tiny']; st = q.plan(p, ablations=True); "
                             "print(json.dumps([[s['name'] for s in st], q.method_specs(p, st, Path('/w'))]))")
  assert names[:2] == ["base", "aux_c"]
  for f in ("lp0.25", "lp0.50", "lp0.75"):
    assert f"lp_alone_{f}" in names and f"kvp_{f}" in names
  ablations = {"kvp_lp0.50_kv_reduce-sum", "kvp_lp0.50_predictor-activation", "kvp_lp0.50_attention_mode-aligned"}
  assert ablations <= set(names)
  assert "kvp:lp0.50@/w/kvp_lp0.50_kv_reduce-sum;kv_reduce=sum" in specs
  assert "aux_only:c@/w/aux_c" in specs and specs[0] == "base"
  # SwiftKV at their Llama cutoff (0.5) and at 0.25, trained as KV Prediction is, evaluated from its workdir
  assert {"swiftkv_0.50", "swiftkv_0.25"} <= set(names) and "swiftkv@/w/swiftkv_0.50" in specs


# Slow (~2 min): the default suite covers this path in parts, the fit and trained KVP with every rival in the
# notebook's smoke tier (tests/test_notebook.py), the zero-step preset below, stage reuse in the tiny preset's test.
@pytest.mark.slow
def test_smollm2_path_end_to_end_on_a_tiny_chat_model_then_reuses_every_stage(tmp_path):
  base = tiny_chat_model_dir(tmp_path / "base")
  wd = tmp_path / "run"
  out = _quickstart(wd, f"--base={base}", preset="smollm2-smoke")
  assert "matmul" in out  # the machine record: CPU and measured matmul peak beside the times
  report = json.loads((wd / "eval" / "report.json").read_text())
  assert report["tasks"] == ["qa_easy_em", "qa_2hop_em", "code_token_acc", "first_token_agree", "first_token_kl"]
  rows = {r["label"]: r for r in report["results"]}
  assert {"base", "lp_alone[lp0.50]", "kvp[lp0.50](train_steps=0)", "kvp[lp0.50]"} <= set(rows)
  assert {r["method"] for r in rows.values()} == {"base", "lp_alone", "kvp", "kvp_recompute", "lazyllm",
                                                  "random_prune", "static_prune", "swiftkv", "specprefill",
                                                  "gemfilter"}
  for r in rows.values():
    assert set(r["metrics"]) == set(r["stderr"]) == set(r["n"]) == set(report["tasks"])
    assert r["n"]["qa_easy_em"] == 4 and r["n"]["first_token_kl"] == 4 + 4 + 4
    assert len(r["per_example"]["first_token_agree"]) == 12
  assert rows["base"]["metrics"]["first_token_agree"] == 1.0 and rows["base"]["metrics"]["first_token_kl"] == 0.0
  # the least-squares fit was written, and the trained row started from it
  fit = json.loads((wd / "kvp_lp0.50_lstsq" / "lstsq.json").read_text())
  assert fit["tokens"] >= 256 and len(fit["r2_k"]) == 4 and fit["r2_k"][0] > 0.99  # base layer 0 is the aux's own
  cfg = json.loads((wd / "kvp_lp0.50" / "kvp_config.json").read_text())
  assert cfg["init_from"].endswith("kvp_lp0.50_lstsq") and cfg["base_checkpoint"] == str(base.absolute())
  eq = [e for e in report["equal_flops"] if e["metric"] == "first_token_kl"]
  assert len(eq) == 2 and all(e["aux_alone_method"] == "lp_alone" and e["diff_se"] is not None for e in eq)
  for f in ("report.md", "pareto.png", "kv_error.png"):
    assert (wd / "eval" / f).stat().st_size > 0
  assert "first_token_kl (n=12)" in (wd / "eval" / "report.md").read_text()
  flags = (wd / "eval.flags").read_text()
  assert "--qa_levels=easy,2hop" in flags and "--fidelity=True" in flags

  again = _quickstart(wd, f"--base={base}", preset="smollm2-smoke")
  assert again.count("reused") == 5, again  # LP alone, the fit, KVP training, SwiftKV, and the evaluation


def test_smollm2_plan_fits_then_trains_each_aux_and_ablations_share_the_fit():
  *stages, specs = _plan_json("p = q.PRESETS['smollm2']; st = q.plan(p, ablations=True, base='/b'); "
                               "print(json.dumps([[s['name'], s['needs']] for s in st] + "
                               "[q.method_specs(p, st, Path('/w'))]))")
  needs = dict(stages)
  for f in ("lp0.25", "lp0.50", "lp0.75"):
    assert needs[f"lp_alone_{f}"] == [] and needs[f"kvp_{f}_lstsq"] == [] and needs[f"kvp_{f}"] == [f"kvp_{f}_lstsq"]
    assert f"kvp:{f}@/w/kvp_{f}_lstsq;train_steps=0" in specs and f"kvp:{f}@/w/kvp_{f}" in specs
  assert "base" not in needs and "aux_c" not in needs  # the base is frozen and given; no KVP-C
  assert needs["kvp_lp0.50_kv_reduce-sum"] == ["kvp_lp0.50_lstsq"]  # training-only ablations share the main fit
  assert needs["kvp_lp0.50_predictor-activation"] == ["kvp_lp0.50_predictor-activation_lstsq"]
  assert specs[0] == "base" and not any(s.startswith("aux_only") for s in specs)
  assert needs["swiftkv_0.50"] == [] and "swiftkv@/w/swiftkv_0.50" in specs  # SwiftKV trains from the frozen base
  assert "specprefill:lp0.25@/w/lp_alone_lp0.25;keep=0.3" in specs  # its draft is the LP-alone model


def test_smollm2_quick_plan_fits_one_aux_and_trains_nothing():
  names, specs = _plan_json("p = q.PRESETS['smollm2-quick']; st = q.plan(p, base='/b'); "
                             "print(json.dumps([[s['name'] for s in st], q.method_specs(p, st, Path('/w'))]))")
  assert names == ["kvp_lp0.50_lstsq"]  # no LP alone, KVP or SwiftKV training stage
  assert specs[:3] == ["base", "lp_alone:lp0.50;train_steps=0", "kvp:lp0.50@/w/kvp_lp0.50_lstsq;train_steps=0"]
  assert not any(s.startswith(("swiftkv", "specprefill", "gemfilter")) for s in specs)  # in smollm2(-full)
  assert specs[3:] == ["kvp_recompute:lp0.50@/w/kvp_lp0.50_lstsq;num_intervals=2;interval_size=16",
                       "lazyllm;schedule=8:0.7,15:0.5,23:0.4", "random_prune;keep=0.5", "static_prune;keep=0.5"]


def test_zero_step_real_preset_end_to_end_on_a_tiny_chat_model(tmp_path):
  """smollm2-quick's path (nothing trained) on the smoke preset's sizes: the fit, LP alone and SpecPrefill's draft
  built as the pruned base, the report pairing the fit with the untrained LP alone; a rerun reuses the fit and the
  evaluation."""
  base = tiny_chat_model_dir(tmp_path / "base")
  wd = tmp_path / "run"
  code = ("p = dict(q.PRESETS['smollm2-smoke'], kvp={'steps': 0, 'lr': 1e-4, 'warmup_steps': 0, 'batch_size': 2}, "
          "extra_methods=['random_prune;keep=0.5', 'specprefill:lp0.50;keep=0.5']); "
          f"r = q.run({str(wd)!r}, p, base={str(base)!r}, log=lambda s: None); again = []; "
          f"q.run({str(wd)!r}, p, base={str(base)!r}, log=again.append); "
          "print(json.dumps([r['results'], r['equal_flops'], sum('reused' in s for s in again)]))")
  rows, eq, reused = _plan_json(code, timeout=900)
  assert reused == 2, reused  # the fit and the evaluation
  rows = {r["label"]: r for r in rows}
  assert set(rows) == {"base", "lp_alone[lp0.50](train_steps=0)", "kvp[lp0.50](train_steps=0)",
                       "random_prune(keep=0.5,seed=0)", next(k for k in rows if k.startswith("specprefill[lp0.50]"))}
  assert rows["lp_alone[lp0.50](train_steps=0)"]["ttft_flops"] < rows["base"]["ttft_flops"]
  assert sorted(p.name for p in wd.iterdir()) == ["eval", "eval.flags", "kvp_lp0.50_lstsq"]  # nothing trained
  assert {e["aux_alone_method"] for e in eq} == {"lp_alone"} and all(e["diff_se"] is not None for e in eq)


def test_real_base_flags_fail_in_one_line(tmp_path):
  proc = _quickstart(tmp_path / "a", preset="smollm2-smoke", ok=False)
  assert proc.returncode == 2 and "--base" in proc.stderr.strip().splitlines()[-1]
  proc = _quickstart(tmp_path / "b", f"--base={tmp_path}", preset="smoke", ok=False)
  assert proc.returncode == 2 and "pretrained base" in proc.stderr.strip().splitlines()[-1]
