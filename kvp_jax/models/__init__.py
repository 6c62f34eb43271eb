"""The decoder and what it stands on: config, parameters, layers, RoPE, attention, the KV cache, the decoder,
generation, FLOPs, the language-modelling loss, and checkpoint readers/writers. Imports nothing else of kvp_jax."""
