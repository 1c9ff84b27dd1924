"""The accelerators ComfyUI users run today, as schedules and fills of the engine, each in a module of its own
that names its source and keeps its published defaults; the evaluation (``training.accelerators``) prices them
on the same workload as Morse.

Each module gives ``(schedule spec, fill)`` for a model's blocks: ``easycache`` (ComfyUI core), ``lazycache``
(ComfyUI core, at the denoiser: a run wrapper rather than a fill), ``teacache``, ``fbcache`` (WaveSpeed's First
Block Cache), ``magcache`` (calibrated per model), ``taylorseer`` (orders 1 and 2), ``deepcache`` (the pack's
``inherit_k1``) and ``faster_diffusion`` (the pack's ``propagate`` on key steps).
"""
