"""What touches tensors: the model and its loader, the runner that owns the KV pool
tensors, the attention backends and the sampler."""
