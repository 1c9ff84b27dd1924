"""Standalone tools around the engine: ``python -m training.<tool>`` for train_dot, evaluate, train_reference,
compare_fills, bench_latency and bench_comfy_overhead; their parts live in trainer/, reference/, evaluation/, host/."""
