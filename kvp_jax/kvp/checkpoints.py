"""Loading a trained KV Prediction run (aux model + predictor) back from its workdir.

A kvp workdir (`python -m kvp_jax.train --stage=kvp`) holds `kvp_config.json` (the KVPConfig, the path of the
frozen base it was trained against, the loss and aux settings) and orbax checkpoints whose `params` item is
{"aux": Params, "pred": PredictorParams} (kvp_jax/models/checkpoints.py writes and reads them).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from kvp_jax.kvp import inference, predictor
from kvp_jax.models import hf_checkpoint
from kvp_jax.models import params as P
from kvp_jax.models.checkpoints import KVP_CONFIG, Checkpointer, check_base, load_model, read_json


def load_kvp(workdir, base_params=None, dtype=None):
  """(kcfg, base_params, KVPParams) from a kvp workdir; the base is loaded from the path it recorded."""
  dtype = dtype or jnp.float32
  p = Path(workdir)
  if not (p / KVP_CONFIG).exists():
    raise hf_checkpoint.CheckpointError(f"no {KVP_CONFIG} in {p}; pass a workdir made by --stage=kvp")
  meta = read_json(p / KVP_CONFIG)
  kcfg = predictor.KVPConfig.from_dict(meta["kvp"])
  if base_params is None:
    _, base_params = load_model(meta["base_checkpoint"], dtype)
  check_base(kcfg.base, base_params, p, meta.get("base_checkpoint"))
  ck = Checkpointer(p, save_every=1)
  if ck.latest_step() is None:
    raise hf_checkpoint.CheckpointError(f"{p} has no finished checkpoint yet; train it first (or wait)")
  # shapes only: eval_shape allocates no predictor just to describe what to restore
  abstract = {"aux": P.abstract(kcfg.aux),
              "pred": jax.eval_shape(lambda k: predictor.init(kcfg, k, how="random"), jax.random.PRNGKey(0))}
  try:
    params = ck.restore_params(abstract, hint=f"{KVP_CONFIG} and the checkpoint disagree")
  finally:
    ck.close()
  kp = inference.KVPParams(aux=P.cast(params["aux"], dtype), pred=P.cast(params["pred"], dtype))
  return kcfg, base_params, kp
