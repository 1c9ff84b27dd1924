"""The Dot trainer: the loop, its config, resumable state, data parallelism, device and precision, memory estimate."""
