"""KV Prediction itself: aux models, the predictor, inference, the training loss, FLOPs, and loading a run.

`from kvp_jax import kvp; kvp.kvp_prefill(...)` keeps working as before the folder layout: the inference
names are handed on from kvp_jax/kvp/inference.py.
"""

from kvp_jax.kvp.inference import (KVPParams, build, cache_from_layers, generate, kvp_method, kvp_prefill,  # noqa: F401
                                   layer_errors, positions, predict_cache, predict_layers, predicted_and_true_cache)
