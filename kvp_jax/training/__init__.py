"""How models are trained: the train loop (optax, orbax, grain), the stages, and the device mesh."""
