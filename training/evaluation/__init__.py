"""The evaluation: one workload, the sampling runs, latency and N, quality metrics, and the report."""
