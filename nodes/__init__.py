"""The pack's ComfyUI nodes (V3 node API), thin wrappers over ``morse_engine``.

Imported only inside ComfyUI, through the repository root's ``__init__.py``.
"""
from comfy_api.latest import ComfyExtension, io

from . import dot_folder
from .load_dot_model import LoadDotModel
from .morse_ksampler import MorseKSampler, MorseModelPatch
from .schedule_node import DashDotSchedule

dot_folder.register()

NODES = [LoadDotModel, DashDotSchedule, MorseKSampler, MorseModelPatch]


class MorseExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


def comfy_entrypoint() -> ComfyExtension:
    return MorseExtension()
