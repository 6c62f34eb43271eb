"""The quickstart's smoke preset end to end (every stage, then eval) and its rerun reusing every stage; the plan
with ablations. Run as a subprocess: it is the command CI and users type."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quickstart(workdir, *extra):
  cmd = [sys.executable, "-m", "kvp_jax.quickstart", f"--workdir={workdir}", "--preset=smoke", *extra]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


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


def test_plan_with_ablations_adds_three_kvp_variants_of_one_aux():
  code = ("from kvp_jax import quickstart as q; from pathlib import Path; import json; "
          "p = q.PRESETS['default']; st = q.plan(p, ablations=True); "
          "print(json.dumps([[s['name'] for s in st], q.method_specs(p, st, Path('/w'))]))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  names, specs = json.loads(proc.stdout)
  assert names[:2] == ["base", "aux_c"]
  for f in ("lp0.25", "lp0.50", "lp0.75"):
    assert f"lp_alone_{f}" in names and f"kvp_{f}" in names
  ablations = {"kvp_lp0.50_kv_reduce-sum", "kvp_lp0.50_predictor-activation", "kvp_lp0.50_attention_mode-aligned"}
  assert ablations <= set(names)
  assert "kvp:lp0.50@/w/kvp_lp0.50_kv_reduce-sum;kv_reduce=sum" in specs
  assert "aux_only:c@/w/aux_c" in specs and specs[0] == "base"
  # SwiftKV at their Llama cutoff (0.5) and at 0.25, trained as KV Prediction is, evaluated from its workdir
  assert {"swiftkv_0.50", "swiftkv_0.25"} <= set(names) and "swiftkv@/w/swiftkv_0.50" in specs
