"""Load Dot Model: pick a Dot adapter file from the dot_models folder."""
import logging

from comfy_api.latest import io

from ..morse_engine import DotFile, MorseError
from . import dot_folder
from .types import CATEGORY, DotModelType


class LoadDotModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MorseLoadDotModel",
            display_name="Load Dot Model",
            category=CATEGORY,
            description="Loads a Morse Dot adapter (.safetensors) trained for your checkpoint with "
            "`python -m training.train_dot`. The file is checked when loaded; it is matched to the model when sampling starts.",
            inputs=[
                io.Combo.Input(
                    "dot_name",
                    options=dot_folder.list_files(),
                    tooltip="A Dot adapter from models/dot_models (or a dot_models path in extra_model_paths.yaml).",
                ),
            ],
            outputs=[DotModelType.Output(tooltip="The Dot adapter, for Morse KSampler or Morse Model Patch.")],
        )

    @classmethod
    def execute(cls, dot_name: str) -> io.NodeOutput:
        path = dot_folder.full_path(dot_name)
        try:
            adapter = DotFile(path)
        except MorseError as exc:
            raise ValueError(f"Load Dot Model: {exc}") from None
        if adapter.info.fingerprint.weak:
            logging.getLogger("morse").info(
                "Morse: '%s' was saved before the weight sample, so only its older check (16 tensor means) tells other "
                "weights apart, and a small fine-tune or merge passes it; retrain it to get the stronger check", dot_name)
        return io.NodeOutput(adapter)
