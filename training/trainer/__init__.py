"""The Dot trainers: each layout's (``feature_layout``, ``paper_layout``) and their loops (``rollout``, ``loop``), and
what both share: the optimizer step and schedule (``optim``), resumable state, device and precision; for the
paper's, its config, data parallelism and memory estimate."""
