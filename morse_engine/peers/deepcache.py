"""DeepCache (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free"; horseee/DeepCache, its
``DeepCacheSDHelper``): a full step every ``cache_interval`` steps (uniform: steps 0, i, 2i, ...); the steps
between rerun only the shallow branch, the first input block and the last output block at full resolution, and
take the deep feature entering that output block from the last full step. That is the pack's ``inherit_k1``
(A-SDM's feature inheritance, one block per side) on the schedule ``EveryK(cache_interval)``; on a DiT the same
fill reruns the first and the last block (FORA's cached residual). Defaults are the helper's README and
``main.py``: ``cache_interval=3``, ``cache_branch_id=0``.
"""
from __future__ import annotations

from ..fill_by_name import make_fill
from ..schedules import EveryK

DEFAULT_INTERVAL = 3


def deepcache(blocks, cache_interval: int = DEFAULT_INTERVAL):
    """(schedule, fill) of DeepCache's uniform schedule with its shallowest branch."""
    return EveryK(cache_interval), make_fill("inherit_k1", blocks=blocks)
